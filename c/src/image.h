/* PNG and JPEG files to 8-bit RGB, as the Python runtime decodes them (hiad_runtime/image.py):
 * gray replicated to three channels, alpha dropped (not composited), 16-bit values v -> (v + 128) / 257. */
#ifndef HIAD_IMAGE_H
#define HIAD_IMAGE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int width, height;
    uint8_t *rgb; /* width * height * 3 bytes, rows packed; free() it */
} rgb_image;

/* 0 on success; otherwise -1 with the reason in `error`. */
int load_rgb(const char *path, rgb_image *image, char *error, size_t error_size);

#endif
