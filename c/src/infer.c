/* hiad-infer BUNDLE IMAGE... [--map-dir DIR] [--ort LIBRARY] [--threads N]
 *
 * Decodes each PNG/JPEG, runs the bundle's pipeline graph and prints one JSON line per image:
 * {"input", "score", "decision" (true/false/null), "latency_ms"} or {"input", "error"}. Images must
 * already be at the bundle's image_size (the graph takes nothing else; resize as the Python runtime
 * does, OpenCV INTER_AREA/INTER_LINEAR, before calling). --map-dir writes each map as float32 .npy.
 * Exit status: 0, 1 if any image failed, 2 if the bundle cannot be opened or the arguments are wrong.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hiad.h"
#include "image.h"

static void json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

/* A float32 C-order .npy (format 1.0) that numpy.load reads with allow_pickle=False. */
static int write_npy(const char *path, const float *data, int width, int height) {
    FILE *f = fopen(path, "wb");
    if (f == NULL) return -1;
    char header[128];
    int n = snprintf(header, sizeof header, "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", height, width);
    int total = ((10 + n + 1 + 63) / 64) * 64; /* magic + header + newline, padded to 64 bytes */
    memset(header + n, ' ', (size_t)(total - 10 - n - 1));
    header[total - 10 - 1] = '\n';
    unsigned short length = (unsigned short)(total - 10);
    int ok = fwrite("\x93NUMPY\x01\x00", 1, 8, f) == 8 && fwrite(&length, 2, 1, f) == 1 &&
             fwrite(header, 1, (size_t)length, f) == length &&
             fwrite(data, sizeof(float), (size_t)width * (size_t)height, f) == (size_t)width * (size_t)height;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int usage(void) {
    fprintf(stderr, "usage: hiad-infer BUNDLE IMAGE... [--map-dir DIR] [--ort LIBRARY] [--threads N]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *bundle = NULL, *map_dir = NULL;
    hiad_options options = {NULL, 0};
    char **images = calloc((size_t)argc, sizeof *images);
    int n_images = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--map-dir") == 0 && i + 1 < argc) map_dir = argv[++i];
        else if (strcmp(argv[i], "--ort") == 0 && i + 1 < argc) options.ort_library = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) options.threads = atoi(argv[++i]);
        else if (strncmp(argv[i], "--", 2) == 0) { free(images); return usage(); }
        else if (bundle == NULL) bundle = argv[i];
        else images[n_images++] = argv[i];
    }
    if (bundle == NULL || n_images == 0) {
        free(images);
        return usage();
    }
    char error[1024];
    hiad_t *h = hiad_open(bundle, &options, error, sizeof error);
    if (h == NULL) {
        fprintf(stderr, "error: %s\n", error);
        free(images);
        return 2;
    }
    int width, height, failures = 0;
    hiad_input_size(h, &width, &height);
    float *map = malloc(sizeof(float) * (size_t)width * (size_t)height);
    for (int i = 0; i < n_images; i++) {
        double t0 = now_ms();
        rgb_image image;
        hiad_result r;
        int rc = load_rgb(images[i], &image, error, sizeof error);
        if (rc == 0) {
            rc = hiad_predict(h, image.rgb, image.width, image.height, (size_t)image.width * 3, &r, map);
            if (rc) {
                int n = snprintf(error, sizeof error, "%s: ", images[i]);
                hiad_last_error(h, error + n, sizeof error - (size_t)n);
            }
            free(image.rgb);
        }
        double latency = now_ms() - t0;
        printf("{\"input\": ");
        json_string(images[i]);
        if (rc == 0 && map_dir) {
            char path[4096];
            const char *name = base_name(images[i]);
            const char *dot = strrchr(name, '.');
            snprintf(path, sizeof path, "%s/%.*s.npy", map_dir, dot ? (int)(dot - name) : (int)strlen(name), name);
            if (write_npy(path, map, width, height)) {
                snprintf(error, sizeof error, "%.900s: cannot write the map", path);
                rc = -1;
            }
        }
        if (rc) {
            failures++;
            printf(", \"error\": ");
            json_string(error);
            printf("}\n");
            fprintf(stderr, "error: %s\n", error);
        } else {
            printf(", \"score\": %.9g, \"decision\": %s, \"latency_ms\": %.3f}\n", r.score,
                   r.decision < 0 ? "null" : r.decision ? "true" : "false", latency);
        }
        fflush(stdout);
    }
    free(map);
    free(images);
    hiad_close(h);
    return failures ? 1 : 0;
}
