/* hiad-infer BUNDLE IMAGE... [--map-dir DIR] [--max-pixels N] [--ort LIBRARY] [--threads N]
 *
 * Decodes each PNG/JPEG, runs the bundle's pipeline graph and prints one JSON line per image:
 * {"input", "score", "decision" (true/false/null), "latency_ms"[, "map"]} or {"input", "error"}. Images must
 * already be at the bundle's image_size (the graph takes nothing else; resize as the Python runtime
 * does, OpenCV INTER_AREA/INTER_LINEAR, before calling). An image whose header declares more than
 * --max-pixels pixels (default: 4x the bundle's image area) is refused before it is decoded.
 * --map-dir writes each map as float32 .npy under its key (maps.h), named in the line's "map".
 * A bad image is reported on its line and on stderr, and the next one is still scored.
 * Exit status: 0, 1 if any image failed, 2 if the bundle cannot be opened or the arguments are wrong.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hiad.h"
#include "image.h"
#include "maps.h"

static void json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int usage(const char *why, const char *argument) {
    if (why) fprintf(stderr, "error: %s: %s\n", why, argument);
    fprintf(stderr, "usage: hiad-infer BUNDLE IMAGE... [--map-dir DIR] [--max-pixels N] [--ort LIBRARY] "
                    "[--threads N]\n");
    return 2;
}

/* A whole positive number, or 0 when `text` is not one. */
static unsigned long long positive(const char *text) {
    char *end = NULL;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    return (errno || end == text || *end || text[0] == '-') ? 0 : value;
}

/* Score image `path` into `r` and `map`; 0, or -1 with the reason (naming `path`) in `error`. */
static int score(hiad_t *h, const char *path, unsigned long long max_pixels, hiad_result *r, float *map, char *error,
                 size_t size) {
    rgb_image image;
    if (load_rgb(path, max_pixels, &image, error, size)) return -1;
    int rc = hiad_predict(h, image.rgb, image.width, image.height, (size_t)image.width * 3, r, map);
    if (rc) {
        int n = snprintf(error, size, "%s: ", path);
        hiad_last_error(h, error + n, size - (size_t)n);
    }
    free(image.rgb);
    return rc;
}

int main(int argc, char **argv) {
    const char *bundle = NULL, *map_dir = NULL;
    unsigned long long max_pixels = 0; /* 0: the default */
    hiad_options options = {NULL, 0};
    char **images = calloc((size_t)argc, sizeof *images);
    int n_images = 0;
    const char *bad = NULL, *why = NULL; /* a refused argument and the reason */
    for (int i = 1; i < argc && bad == NULL; i++) {
        if (strcmp(argv[i], "--map-dir") == 0 && i + 1 < argc) map_dir = argv[++i];
        else if (strcmp(argv[i], "--ort") == 0 && i + 1 < argc) options.ort_library = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) options.threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--max-pixels") == 0 && i + 1 < argc) {
            if ((max_pixels = positive(argv[++i])) == 0) {
                bad = argv[i];
                why = "--max-pixels takes a whole number >= 1";
            }
        } else if (strncmp(argv[i], "--", 2) == 0) {
            bad = argv[i];
            why = "unknown option or missing value";
        } else if (bundle == NULL) {
            bundle = argv[i];
        } else {
            images[n_images++] = argv[i];
        }
    }
    if (bad || bundle == NULL || n_images == 0) {
        free(images);
        return usage(why, bad);
    }
    char error[2048];
    hiad_t *h = hiad_open(bundle, &options, error, sizeof error);
    if (h == NULL) {
        fprintf(stderr, "error: %s\n", error);
        free(images);
        return 2;
    }
    char **keys = NULL;
    if (map_dir && (make_folders(map_dir) || (keys = output_keys(images, n_images)) == NULL)) {
        fprintf(stderr, "error: %s: cannot write maps there (%s)\n", map_dir, strerror(errno));
        hiad_close(h);
        free(images);
        return 2;
    }
    fprintf(stderr, "hiad-infer: %s\n", hiad_runtime_info(h));
    int width, height, failures = 0;
    hiad_input_size(h, &width, &height);
    if (max_pixels == 0) max_pixels = HIAD_MAX_PIXELS_FACTOR * (unsigned long long)width * (unsigned long long)height;
    float *map = malloc(sizeof(float) * (size_t)width * (size_t)height);
    for (int i = 0; i < n_images; i++) {
        double t0 = now_ms();
        hiad_result r;
        int rc = score(h, images[i], max_pixels, &r, map, error, sizeof error);
        double latency = now_ms() - t0;
        if (rc == 0 && map_dir && write_map(map_dir, keys[i], map, width, height)) {
            snprintf(error, sizeof error, "%.1000s/%.900s.npy: cannot write the map (%s)", map_dir, keys[i],
                     strerror(errno));
            rc = -1;
        }
        printf("{\"input\": ");
        json_string(images[i]);
        if (rc) {
            failures++;
            printf(", \"error\": ");
            json_string(error);
            printf("}\n");
            fprintf(stderr, "error: %s\n", error);
        } else {
            printf(", \"score\": %.9g, \"decision\": %s, \"latency_ms\": %.3f", r.score,
                   r.decision < 0 ? "null" : r.decision ? "true" : "false", latency);
            if (map_dir) {
                char name[4096];
                snprintf(name, sizeof name, "%s.npy", keys[i]);
                printf(", \"map\": ");
                json_string(name);
            }
            printf("}\n");
        }
        fflush(stdout);
    }
    free(map);
    free_keys(keys, n_images);
    free(images);
    hiad_close(h);
    return failures ? 1 : 0;
}
