/* PNG (libpng) and JPEG (libjpeg-turbo) decoding to packed 8-bit RGB; see image.h. */
#include "image.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h> /* needs stdio.h first */
#include <jerror.h>
#include <png.h>

static void fail(char *error, size_t size, const char *path, const char *why) {
    snprintf(error, size, "%s: %s", path, why);
}

/* One decoded row of `channels` samples (8-bit, or 16-bit big-endian) per pixel -> RGB. */
static void row_to_rgb(const uint8_t *in, uint8_t *out, int width, int channels, int sixteen) {
    for (int x = 0; x < width; x++) {
        uint8_t v[4] = {0};
        for (int c = 0; c < channels && c < 4; c++) {
            if (sixteen) {
                unsigned s = ((unsigned)in[2 * (x * channels + c)] << 8) | in[2 * (x * channels + c) + 1];
                v[c] = (uint8_t)((s + 128) / 257);
            } else {
                v[c] = in[x * channels + c];
            }
        }
        int gray = channels <= 2;
        out[3 * x] = v[0];
        out[3 * x + 1] = gray ? v[0] : v[1];
        out[3 * x + 2] = gray ? v[0] : v[2];
    }
}

/* The header's declared size against the pixel budget, before any pixel memory exists. */
static int over_budget(uint64_t width, uint64_t height, uint64_t max_pixels, const char *path, char *error,
                       size_t size) {
    if (width * height <= max_pixels) return 0;
    snprintf(error, size, "%s: declares %llux%llu = %llu pixels, above the limit of %llu", path,
             (unsigned long long)width, (unsigned long long)height, (unsigned long long)(width * height),
             (unsigned long long)max_pixels);
    return 1;
}

/* Where a decoder's error handler writes the message: the caller's buffer, so nothing local to the
 * function that called setjmp changes before the longjmp. */
typedef struct {
    const char *path;
    char *error;
    size_t size;
} failure;

/* libpng's error handler (its default prints the message to stderr). */
static void png_fail(png_structp png, png_const_charp message) {
    const failure *to = png_get_error_ptr(png);
    snprintf(to->error, to->size, "%s: not a readable image (corrupt PNG: %s)", to->path, message);
    png_longjmp(png, 1);
}

static int load_png(FILE *f, const char *path, uint64_t max_pixels, rgb_image *image, char *error, size_t size) {
    failure to = {path, error, size};
    fail(error, size, path, "out of memory");
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &to, png_fail, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    uint8_t *volatile raw = NULL;
    png_bytep *volatile rows = NULL;
    if (info == NULL || setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, NULL);
        free(raw);
        free(rows);
        free(image->rgb);
        image->rgb = NULL;
        if (feof(f)) /* libpng asked for bytes past the end ("Read Error") */
            fail(error, size, path, "not a readable image (truncated PNG: the file ends before the image does)");
        return -1;
    }
    png_init_io(png, f);
    png_read_info(png, info);
    if (over_budget(png_get_image_width(png, info), png_get_image_height(png, info), max_pixels, path, error, size)) {
        png_destroy_read_struct(&png, &info, NULL);
        return -1;
    }
    if (png_get_color_type(png, info) == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (png_get_bit_depth(png, info) < 8) png_set_expand_gray_1_2_4_to_8(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    int width = (int)png_get_image_width(png, info), height = (int)png_get_image_height(png, info);
    size_t stride = png_get_rowbytes(png, info);
    raw = malloc(stride * (size_t)height);
    rows = malloc(sizeof(png_bytep) * (size_t)height);
    image->rgb = malloc((size_t)width * (size_t)height * 3);
    if (raw == NULL || rows == NULL || image->rgb == NULL) png_error(png, "out of memory");
    for (int y = 0; y < height; y++) rows[y] = raw + (size_t)y * stride;
    png_read_image(png, rows);
    png_read_end(png, NULL); /* up to IEND: a file cut after its last pixel row is truncated too */
    int channels = png_get_channels(png, info), sixteen = png_get_bit_depth(png, info) == 16;
    for (int y = 0; y < height; y++) row_to_rgb(rows[y], image->rgb + (size_t)y * (size_t)width * 3, width, channels, sixteen);
    image->width = width;
    image->height = height;
    png_destroy_read_struct(&png, &info, NULL);
    free(raw);
    free(rows);
    return 0;
}

typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf jump;
    failure to;
} jpeg_error;

/* libjpeg's errors end the decoding with its message (its default prints it and exits). */
static void jpeg_fail(j_common_ptr cinfo) {
    jpeg_error *e = (jpeg_error *)cinfo->err;
    char message[JMSG_LENGTH_MAX];
    e->base.format_message(cinfo, message);
    snprintf(e->to.error, e->to.size, "%s: not a readable image (corrupt JPEG: %s)", e->to.path, message);
    longjmp(e->jump, 1);
}

/* Level -1 is a warning, which libjpeg raises for corrupt or missing data that it then fills in with
 * gray and decodes on ("Premature end of JPEG file" for a truncated one): an error here. Levels >= 0
 * are trace messages. */
static void jpeg_message(j_common_ptr cinfo, int level) {
    if (level < 0) jpeg_fail(cinfo);
}

static int load_jpeg(FILE *f, const char *path, uint64_t max_pixels, rgb_image *image, char *error, size_t size) {
    struct jpeg_decompress_struct cinfo;
    jpeg_error jerr;
    cinfo.err = jpeg_std_error(&jerr.base);
    jerr.base.error_exit = jpeg_fail;
    jerr.base.emit_message = jpeg_message;
    jerr.to = (failure){path, error, size};
    uint8_t *volatile row = NULL;
    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        free(row);
        free(image->rgb);
        image->rgb = NULL;
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_stdio_src(&cinfo, f);
    jpeg_read_header(&cinfo, TRUE);
    int refused = over_budget(cinfo.image_width, cinfo.image_height, max_pixels, path, error, size);
    if (!refused && (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK)) {
        fail(error, size, path, "CMYK JPEG is not supported");
        refused = 1;
    }
    if (refused) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    cinfo.out_color_space = cinfo.num_components == 1 ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_start_decompress(&cinfo);
    image->width = (int)cinfo.output_width;
    image->height = (int)cinfo.output_height;
    int channels = cinfo.output_components;
    row = malloc((size_t)image->width * (size_t)channels);
    image->rgb = malloc((size_t)image->width * (size_t)image->height * 3);
    if (row == NULL || image->rgb == NULL) ERREXIT1(&cinfo, JERR_OUT_OF_MEMORY, 0);
    while (cinfo.output_scanline < cinfo.output_height) {
        int y = (int)cinfo.output_scanline;
        JSAMPROW rows[1] = {row};
        jpeg_read_scanlines(&cinfo, rows, 1);
        row_to_rgb(row, image->rgb + (size_t)y * (size_t)image->width * 3, image->width, channels, 0);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return 0;
}

int load_rgb(const char *path, uint64_t max_pixels, rgb_image *image, char *error, size_t size) {
    image->rgb = NULL;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fail(error, size, path, "cannot read file");
        return -1;
    }
    uint8_t magic[8] = {0};
    size_t n = fread(magic, 1, sizeof magic, f);
    rewind(f);
    int rc;
    if (n == 8 && png_sig_cmp(magic, 0, 8) == 0) {
        rc = load_png(f, path, max_pixels, image, error, size);
    } else if (n >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) {
        rc = load_jpeg(f, path, max_pixels, image, error, size);
    } else {
        fail(error, size, path, "not a PNG or JPEG file");
        rc = -1;
    }
    fclose(f);
    return rc;
}
