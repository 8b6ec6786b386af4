/* hiad-stress BUNDLE IMAGE N: N predictions on one image, for the tests' leak checks (run it under
 * AddressSanitizer) and memory-growth checks. Prints one JSON line: the anonymous resident memory (RssAnon:
 * what a leak grows; VmRSS also counts the mapped library's pages, which a busy machine evicts and reloads)
 * after the first tenth, after half and after all of the predictions, and the last score. */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hiad.h"
#include "image.h"

static long anon_rss_kb(void) {
    malloc_trim(0);
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "RssAnon:", 8) == 0) kb = atol(line + 8);
    if (f) fclose(f);
    return kb;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: hiad-stress BUNDLE IMAGE N\n");
        return 2;
    }
    char error[1024];
    hiad_t *h = hiad_open(argv[1], NULL, error, sizeof error);
    if (h == NULL) {
        fprintf(stderr, "error: %s\n", error);
        return 2;
    }
    int width, height;
    hiad_input_size(h, &width, &height);
    rgb_image image;
    if (load_rgb(argv[2], HIAD_MAX_PIXELS_FACTOR * (uint64_t)width * (uint64_t)height, &image, error, sizeof error)) {
        fprintf(stderr, "error: %s\n", error);
        hiad_close(h);
        return 2;
    }
    int n = atoi(argv[3]), warm = n / 10 > 0 ? n / 10 : 1, rc = 0;
    float *map = malloc(sizeof(float) * (size_t)image.width * (size_t)image.height);
    hiad_result r = {0, -1};
    long rss_warm = -1, rss_half = -1;
    for (int i = 0; i < n && rc == 0; i++) {
        rc = hiad_predict(h, image.rgb, image.width, image.height, (size_t)image.width * 3, &r, map);
        if (i + 1 == warm) rss_warm = anon_rss_kb();
        if (i + 1 == n / 2) rss_half = anon_rss_kb();
    }
    if (rc) {
        hiad_last_error(h, error, sizeof error);
        fprintf(stderr, "error: %s\n", error);
    } else {
        printf("{\"predictions\": %d, \"anon_kb_warm\": %ld, \"anon_kb_half\": %ld, \"anon_kb_end\": %ld, "
               "\"score\": %.9g}\n", n, rss_warm, rss_half, anon_rss_kb(), r.score);
    }
    free(map);
    free(image.rgb);
    hiad_close(h);
    return rc ? 1 : 0;
}
