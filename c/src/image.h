/* PNG and JPEG files to 8-bit RGB, as the Python runtime decodes them (hiad_runtime/image.py):
 * gray replicated to three channels, alpha dropped (not composited), 16-bit values v -> (v + 128) / 257.
 * A file is an error unless it decodes completely: a truncated PNG or JPEG is refused, as is any
 * JPEG that libjpeg warns about (its warnings mean corrupt or missing data, filled in with gray). */
#ifndef HIAD_IMAGE_H
#define HIAD_IMAGE_H

#include <stddef.h>
#include <stdint.h>

/* The default pixel budget of an input, in multiples of the bundle's image area (the Python
 * runtime's MAX_PIXELS_FACTOR, hiad_runtime/image.py). */
#define HIAD_MAX_PIXELS_FACTOR 4

typedef struct {
    int width, height;
    uint8_t *rgb; /* width * height * 3 bytes, rows packed; free() it */
} rgb_image;

/* 0 on success; otherwise -1 with the reason, naming `path`, in `error`. A file whose header declares
 * more than `max_pixels` pixels is refused before any pixel memory is allocated (a JPEG of a few hundred
 * bytes can declare 30000 x 30000). */
int load_rgb(const char *path, uint64_t max_pixels, rgb_image *image, char *error, size_t error_size);

#endif
