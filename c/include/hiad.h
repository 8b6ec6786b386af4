/* hiad: run a hiad-deploy bundle's whole-image pipeline graph (pipeline.onnx) from C.
 *
 * One handle per bundle, no global state. hiad_open resolves the bundle folder once, refuses any path
 * manifest.json lists that is absolute, has a `..` part or leads outside the bundle through a symlink
 * (before opening or measuring it), verifies the graph's byte size and sha256 against the manifest and
 * the schema version, then loads ONNX Runtime's shared library with dlopen (the C API version is
 * checked at run time). hiad_predict may be called from several threads at once on one handle (ONNX
 * Runtime sessions are thread-safe and every buffer is per call); hiad_last_error copies the most
 * recent failure of any of them.
 */
#ifndef HIAD_H
#define HIAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The manifest schema_version this library reads. */
#define HIAD_SCHEMA_VERSION 3

typedef struct hiad hiad_t;

typedef struct {
    /* libonnxruntime.so to load, and only it; NULL: $HIAD_ORT_LIBRARY, and when neither names one, the first
     * that loads of libonnxruntime.so.1, libonnxruntime.so (the loader's search path) and the library
     * `make` found at build time. The error lists every attempt. */
    const char *ort_library;
    int threads;             /* ONNX Runtime intra-op threads; 0: one per core */
} hiad_options;

typedef struct {
    float score;  /* image score, on the scale of the map */
    int decision; /* 1 anomalous, 0 good (score >= the bundle's image threshold); -1 without one */
} hiad_result;

/* Open a bundle directory; NULL on failure, with the reason (naming the file) in `error`. */
hiad_t *hiad_open(const char *bundle_dir, const hiad_options *options, char *error, size_t error_size);

/* The image size the bundle expects: hiad_predict takes RGB images of exactly this size. */
void hiad_input_size(const hiad_t *h, int *width, int *height);

/* The bundle's thresholds; each is NaN when the bundle has none. */
void hiad_thresholds(const hiad_t *h, float *image, float *pixel);

/* Score one RGB image (3 bytes per pixel, rows `stride` bytes apart). When `map` is not NULL it
 * receives the anomaly map, width * height floats in row order. Returns 0, or -1 on failure
 * (see hiad_last_error). */
int hiad_predict(hiad_t *h, const uint8_t *rgb, int width, int height, size_t stride, hiad_result *result, float *map);

/* Copy the last failure's message into `buffer` (always NUL-terminated); returns its length. */
size_t hiad_last_error(hiad_t *h, char *buffer, size_t size);

/* "onnxruntime <version> (<file>), C API <n>": the library loaded, its file and the API version in use. */
const char *hiad_runtime_info(const hiad_t *h);

void hiad_close(hiad_t *h);

#ifdef __cplusplus
}
#endif
#endif
