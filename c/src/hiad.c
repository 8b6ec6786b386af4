/* hiad.h implemented on ONNX Runtime's C API, loaded with dlopen; see hiad.h for the contract.
 *
 * The graph file is read once, checked against the manifest's sha256 and byte count, and the session
 * is created from those verified bytes (no second read that could differ). The graph's metadata
 * carries what a caller needs at run time (image size, thresholds, schema version, bundle identity),
 * so the manifest is only read for the checksum, the schema and its paths (each confined to the bundle).
 */
#define _GNU_SOURCE /* dladdr: which file the loader found */
#include "hiad.h"

#include <dlfcn.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <onnxruntime_c_api.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The oldest C API that has every function used here (AddSessionConfigEntry came with 1.7). */
#define HIAD_MIN_ORT_API 7

/* The ONNX Runtime library `make` found when it built this file (c/Makefile), tried last. */
#ifndef HIAD_ORT_BUILT
#define HIAD_ORT_BUILT ""
#endif

struct hiad {
    void *library;
    const OrtApi *api;
    OrtEnv *env;
    OrtSession *session;
    OrtMemoryInfo *memory;
    int width, height;
    float image_threshold, pixel_threshold;
    char info[PATH_MAX + 64];
    pthread_mutex_t lock; /* guards `error` */
    char error[2048];
};

static void set_error(hiad_t *h, const char *fmt, ...) {
    char message[sizeof h->error];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    pthread_mutex_lock(&h->lock);
    memcpy(h->error, message, sizeof message);
    pthread_mutex_unlock(&h->lock);
}

/* Turn a failed OrtStatus into the handle's error; returns -1 on failure, 0 otherwise. */
static int ort_failed(hiad_t *h, OrtStatus *status, const char *what) {
    if (status == NULL) return 0;
    set_error(h, "%s: %s", what, h->api->GetErrorMessage(status));
    h->api->ReleaseStatus(status);
    return -1;
}

static void sha256_hex(const unsigned char *data, size_t size, char out[65]) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    EVP_Digest(data, size, digest, &length, EVP_sha256(), NULL);
    for (unsigned int i = 0; i < length && i < 32; i++) sprintf(out + 2 * i, "%02x", digest[i]);
    out[64] = '\0';
}

typedef struct {
    char graph[512];
    char sha256[65];
    long long bytes;
    char bundle_id[65];
} pipeline_entry;

/* Whether the real path `path` is `root` or lies below it. */
static int inside(const char *path, const char *root) {
    size_t n = strlen(root);
    return strncmp(path, root, n) == 0 && (path[n] == '\0' || path[n] == '/' || strcmp(root, "/") == 0);
}

/* Whether one of the '/'-separated parts of `name` is "..". */
static int climbs(const char *name) {
    for (const char *part = name; *part; part += strcspn(part, "/"), part += *part == '/')
        if (strcspn(part, "/") == 2 && part[0] == '.' && part[1] == '.') return 1;
    return 0;
}

/* `root/name` into `path`, refused (-1, error set) unless `name` is relative, has no `..` part and stays
 * inside `root` (a real path) with symlinks followed: hiad_runtime/bundle.py's rule and messages. It is
 * checked before the file is opened or measured, so a manifest cannot make the library read, or reveal
 * the size of, anything outside its bundle. A missing file is judged by its deepest existing folder. */
static int confined(hiad_t *h, const char *root, const char *name, char *path, size_t size) {
    if (name[0] == '\0' || name[0] == '/' || climbs(name)) {
        set_error(h, "%s: manifest path '%s' is absolute or contains '..'; refused (files must be inside the bundle)",
                  root, name);
        return -1;
    }
    char real[PATH_MAX], probe[PATH_MAX];
    if ((size_t)snprintf(path, size, "%s/%s", root, name) >= size || strlen(path) >= sizeof probe) {
        set_error(h, "%s: manifest path '%.200s...' is too long; refused", root, name);
        return -1;
    }
    strcpy(probe, path);
    while (realpath(probe, real) == NULL) {
        char *slash = strrchr(probe, '/');
        if ((errno != ENOENT && errno != ENOTDIR) || slash == NULL) {
            set_error(h, "%s: manifest path '%s' cannot be resolved (%s); refused", root, name, strerror(errno));
            return -1;
        }
        *slash = '\0';
    }
    if (!inside(real, root)) {
        set_error(h, "%s: manifest path '%s' leads outside the bundle (through a symlink); refused", root, name);
        return -1;
    }
    return 0;
}

/* Every path `files` lists, confined to `root` before any of them is opened (as the Python loader does). */
static int confine_all(hiad_t *h, const char *root, json_t *files) {
    const char *name;
    json_t *info;
    char path[PATH_MAX];
    json_object_foreach(files, name, info) {
        if (confined(h, root, name, path, sizeof path)) return -1;
    }
    return 0;
}

/* Read and check manifest.json in the real folder `root`: schema, schema_version, every listed path,
 * the pipeline entry and its checksum. */
static int read_manifest(hiad_t *h, const char *root, pipeline_entry *entry) {
    char path[PATH_MAX];
    if (confined(h, root, "manifest.json", path, sizeof path)) return -1;
    json_error_t jerr;
    json_t *root_json = json_load_file(path, 0, &jerr);
    if (root_json == NULL) {
        FILE *f = fopen(path, "rb");
        if (f == NULL) {
            set_error(h, "%s: not a bundle (no manifest.json)", root);
        } else {
            fclose(f);
            set_error(h, "%s: unreadable manifest (%s, line %d)", path, jerr.text, jerr.line);
        }
        return -1;
    }
    int rc = -1;
    const char *schema = json_string_value(json_object_get(root_json, "schema"));
    json_t *version = json_object_get(root_json, "schema_version");
    json_t *pipeline = json_object_get(root_json, "pipeline");
    const char *unsupported = json_string_value(json_object_get(pipeline, "unsupported"));
    const char *graph = json_string_value(json_object_get(json_object_get(pipeline, "graph"), "file"));
    const char *bundle_id = json_string_value(json_object_get(json_object_get(pipeline, "metadata"), "hiad.bundle_id"));
    json_t *files = json_object_get(root_json, "files");
    if (schema == NULL || strcmp(schema, "hiad-bundle") != 0) {
        set_error(h, "%s: schema '%s' is not 'hiad-bundle'", path, schema ? schema : "(none)");
    } else if (!json_is_integer(version) || json_integer_value(version) != HIAD_SCHEMA_VERSION) {
        set_error(h, "%s: schema_version %lld is not supported (this library reads %d)", path,
                  json_is_integer(version) ? (long long)json_integer_value(version) : -1LL, HIAD_SCHEMA_VERSION);
    } else if (!json_is_object(files)) {
        set_error(h, "%s: malformed manifest: files is not an object", path);
    } else if (confine_all(h, root, files)) {
        rc = -1; /* confine_all named the entry */
    } else if (unsupported != NULL) {
        set_error(h, "%s: no pipeline graph: %s", root, unsupported);
    } else if (graph == NULL || bundle_id == NULL) {
        set_error(h, "%s: the bundle has no pipeline graph (exported before it existed)", path);
    } else {
        json_t *file = json_object_get(files, graph);
        const char *sha = json_string_value(json_object_get(file, "sha256"));
        json_t *bytes = json_object_get(file, "bytes");
        if (sha == NULL || strlen(sha) != 64 || !json_is_integer(bytes)) {
            set_error(h, "%s: refers to files without a checksum: %s", path, graph);
        } else {
            snprintf(entry->graph, sizeof entry->graph, "%s", graph);
            memcpy(entry->sha256, sha, 65);
            entry->bytes = json_integer_value(bytes);
            snprintf(entry->bundle_id, sizeof entry->bundle_id, "%s", bundle_id);
            rc = 0;
        }
    }
    json_decref(root_json);
    return rc;
}

/* The graph file's bytes (`path`, already confined), checked against the manifest: its size before it is
 * read, then its sha256; NULL (error set) when missing, not a regular file, or altered. */
static unsigned char *read_verified(hiad_t *h, const char *path, const pipeline_entry *entry, long *size) {
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (f == NULL || fstat(fileno(f), &st) || !S_ISREG(st.st_mode)) {
        set_error(h, "%s: missing from the bundle (%s)", path, f ? "not a regular file" : strerror(errno));
        if (f) fclose(f);
        return NULL;
    }
    *size = (long)st.st_size;
    unsigned char *data = NULL;
    char hex[65];
    if (st.st_size != entry->bytes) {
        set_error(h, "%s: truncated or altered (%ld bytes, manifest says %lld)", path, *size, entry->bytes);
    } else if ((data = malloc(*size > 0 ? (size_t)*size : 1)) == NULL) {
        set_error(h, "%s: out of memory (%ld bytes)", path, *size);
    } else if (fread(data, 1, (size_t)*size, f) != (size_t)*size) {
        set_error(h, "%s: cannot be read (%s)", path, strerror(errno));
    } else if (sha256_hex(data, (size_t)*size, hex), strcmp(hex, entry->sha256) != 0) {
        set_error(h, "%s: altered (sha256 does not match the manifest)", path);
    } else {
        fclose(f);
        return data;
    }
    fclose(f);
    free(data);
    return NULL;
}

/* dlopen `name` as ONNX Runtime: its OrtGetApiBase (h->library set), or NULL with the reason appended
 * to `tried` ("NAME (SOURCE): WHY"). */
static void *open_runtime(hiad_t *h, const char *name, const char *source, char *tried, size_t size) {
    void *library = dlopen(name, RTLD_NOW | RTLD_LOCAL), *symbol = NULL;
    const char *why = library ? NULL : dlerror();
    if (library && (symbol = dlsym(library, "OrtGetApiBase")) == NULL) why = "not ONNX Runtime (no OrtGetApiBase)";
    if (why) {
        size_t n = strlen(name), used = strlen(tried);
        if (strncmp(why, name, n) == 0 && strncmp(why + n, ": ", 2) == 0) why += n + 2; /* dlerror names it first */
        snprintf(tried + used, size - used, "%s%s (%s): %s", used ? "; " : "", name, source, why);
        if (library) dlclose(library);
        return NULL;
    }
    h->library = library;
    return symbol;
}

/* Load ONNX Runtime: the library the caller names (options, else $HIAD_ORT_LIBRARY), and only it; else
 * the first of the sonames on the loader's path and the library `make` found at build time. */
static int load_runtime(hiad_t *h, const char *library) {
    const char *source = "hiad_options.ort_library";
    if (library == NULL || !*library) {
        library = getenv("HIAD_ORT_LIBRARY");
        source = "$HIAD_ORT_LIBRARY";
    }
    const char *names[] = {"libonnxruntime.so.1", "libonnxruntime.so", HIAD_ORT_BUILT};
    const char *sources[] = {"versioned soname", "unversioned soname", "found by make at build time"};
    char tried[1536] = "";
    void *symbol = NULL;
    if (library != NULL && *library) {
        symbol = open_runtime(h, library, source, tried, sizeof tried);
    } else {
        for (size_t i = 0; i < 3 && symbol == NULL; i++)
            if (*names[i]) symbol = open_runtime(h, names[i], sources[i], tried, sizeof tried);
        if (symbol == NULL && !*HIAD_ORT_BUILT) /* say why there was no third attempt */
            snprintf(tried + strlen(tried), sizeof tried - strlen(tried), "; make found none at build time");
    }
    if (symbol == NULL) {
        set_error(h, "cannot load ONNX Runtime; tried %s; name the library with $HIAD_ORT_LIBRARY or "
                     "hiad_options.ort_library (hiad-infer --ort)", tried);
        return -1;
    }
    const OrtApiBase *(*get_base)(void) = NULL;
    *(void **)&get_base = symbol;
    const OrtApiBase *base = get_base();
    Dl_info where;
    const char *file = dladdr(symbol, &where) && where.dli_fname ? where.dli_fname : "?";
    /* The headers' API version if the library offers it, else the newest older one it does. */
    uint32_t version = ORT_API_VERSION;
    while ((h->api = base->GetApi(version)) == NULL && version > HIAD_MIN_ORT_API) version--;
    if (h->api == NULL) {
        set_error(h, "%s: ONNX Runtime %s offers none of C API versions %d..%d", file, base->GetVersionString(),
                  HIAD_MIN_ORT_API, ORT_API_VERSION);
        return -1;
    }
    snprintf(h->info, sizeof h->info, "onnxruntime %s (%s), C API %u", base->GetVersionString(), file, version);
    return 0;
}

/* A custom metadata value of the graph, copied into `out` ("" when absent). */
static int metadata(hiad_t *h, OrtModelMetadata *meta, const char *key, char *out, size_t size) {
    OrtAllocator *allocator = NULL;
    char *value = NULL;
    if (ort_failed(h, h->api->GetAllocatorWithDefaultOptions(&allocator), "allocator")) return -1;
    if (ort_failed(h, h->api->ModelMetadataLookupCustomMetadataMap(meta, allocator, key, &value), "graph metadata"))
        return -1;
    snprintf(out, size, "%s", value ? value : "");
    if (value) allocator->Free(allocator, value);
    return 0;
}

static float threshold(const char *text) { return text[0] ? strtof(text, NULL) : NAN; }

/* Image size, thresholds, schema and identity from the graph's metadata. */
static int read_metadata(hiad_t *h, const char *graph_path, const pipeline_entry *entry) {
    OrtModelMetadata *meta = NULL;
    if (ort_failed(h, h->api->SessionGetModelMetadata(h->session, &meta), graph_path)) return -1;
    char schema[32], bundle_id[80], width[32], height[32], image[64], pixel[64];
    int rc = metadata(h, meta, "hiad.schema_version", schema, sizeof schema) ||
             metadata(h, meta, "hiad.bundle_id", bundle_id, sizeof bundle_id) ||
             metadata(h, meta, "hiad.image_width", width, sizeof width) ||
             metadata(h, meta, "hiad.image_height", height, sizeof height) ||
             metadata(h, meta, "hiad.image_threshold", image, sizeof image) ||
             metadata(h, meta, "hiad.pixel_threshold", pixel, sizeof pixel);
    h->api->ReleaseModelMetadata(meta);
    if (rc) return -1;
    if (atoi(schema) != HIAD_SCHEMA_VERSION) {
        set_error(h, "%s: graph schema_version '%s' is not supported (this library reads %d)", graph_path, schema,
                  HIAD_SCHEMA_VERSION);
        return -1;
    }
    if (strcmp(bundle_id, entry->bundle_id) != 0) {
        set_error(h, "%s: belongs to another bundle (identity %.12s, manifest says %.12s)", graph_path, bundle_id,
                  entry->bundle_id);
        return -1;
    }
    h->width = atoi(width);
    h->height = atoi(height);
    h->image_threshold = threshold(image);
    h->pixel_threshold = threshold(pixel);
    if (h->width <= 0 || h->height <= 0) {
        set_error(h, "%s: graph metadata lacks the image size", graph_path);
        return -1;
    }
    return 0;
}

static int create_session(hiad_t *h, const char *graph_path, const unsigned char *data, long size, int threads) {
    const OrtApi *api = h->api;
    OrtSessionOptions *options = NULL;
    if (ort_failed(h, api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "hiad", &h->env), "ONNX Runtime environment") ||
        ort_failed(h, api->CreateSessionOptions(&options), "session options"))
        return -1;
    int rc = ort_failed(h, api->SetIntraOpNumThreads(options, threads), "session options") ||
             ort_failed(h, api->SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL), "session options") ||
             ort_failed(h, api->DisableCpuMemArena(options), "session options") ||
             ort_failed(h, api->AddSessionConfigEntry(options, "session.intra_op.allow_spinning", "0"), "session options") ||
             ort_failed(h, api->CreateSessionFromArray(h->env, data, (size_t)size, options, &h->session), graph_path) ||
             ort_failed(h, api->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &h->memory), "memory info");
    api->ReleaseSessionOptions(options);
    return rc ? -1 : 0;
}

hiad_t *hiad_open(const char *bundle_dir, const hiad_options *options, char *error, size_t error_size) {
    hiad_t *h = calloc(1, sizeof *h);
    if (h == NULL) {
        if (error_size) snprintf(error, error_size, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&h->lock, NULL);
    hiad_options defaults = {NULL, 0};
    if (options == NULL) options = &defaults;
    pipeline_entry entry;
    long size = 0;
    unsigned char *graph = NULL;
    char root[PATH_MAX], graph_path[PATH_MAX] = "";
    int rc = -1;
    /* Resolved once: a published bundle is a symlink to its current version, and every file is read from that one. */
    if (realpath(bundle_dir, root) == NULL) set_error(h, "%s: not a bundle (%s)", bundle_dir, strerror(errno));
    else rc = read_manifest(h, root, &entry);
    if (rc == 0) {
        rc = confined(h, root, entry.graph, graph_path, sizeof graph_path);
        graph = rc ? NULL : read_verified(h, graph_path, &entry, &size);
        rc = graph == NULL || load_runtime(h, options->ort_library) ||
             create_session(h, graph_path, graph, size, options->threads) || read_metadata(h, graph_path, &entry);
    }
    free(graph);
    if (rc) {
        if (error_size) hiad_last_error(h, error, error_size);
        hiad_close(h);
        return NULL;
    }
    return h;
}

void hiad_input_size(const hiad_t *h, int *width, int *height) {
    *width = h->width;
    *height = h->height;
}

void hiad_thresholds(const hiad_t *h, float *image, float *pixel) {
    *image = h->image_threshold;
    *pixel = h->pixel_threshold;
}

int hiad_predict(hiad_t *h, const uint8_t *rgb, int width, int height, size_t stride, hiad_result *result, float *map) {
    const OrtApi *api = h->api;
    if (width != h->width || height != h->height) {
        set_error(h, "image is %dx%d, the bundle expects %dx%d (resize it first)", width, height, h->width, h->height);
        return -1;
    }
    size_t row = (size_t)width * 3;
    if (rgb == NULL || stride < row) {
        set_error(h, "image buffer is NULL or its stride %zu is below width * 3 = %zu", stride, row);
        return -1;
    }
    uint8_t *packed = NULL; /* rows copied together when the caller's rows are padded */
    if (stride != row) {
        packed = malloc(row * (size_t)height);
        if (packed == NULL) {
            set_error(h, "out of memory");
            return -1;
        }
        for (int y = 0; y < height; y++) memcpy(packed + (size_t)y * row, rgb + (size_t)y * stride, row);
    }
    const int64_t shape[4] = {1, height, width, 3};
    const char *inputs[1] = {"image"};
    const char *outputs[3] = {"anomaly_map", "score", "decision"};
    size_t n_outputs = isnan(h->image_threshold) ? 2 : 3;
    OrtValue *input = NULL, *values[3] = {NULL, NULL, NULL};
    /* ONNX Runtime only reads the input tensor, so the caller's const buffer is passed as it is. */
    void *pixels = packed ? (void *)packed : (void *)(uintptr_t)rgb;
    int rc = ort_failed(h, api->CreateTensorWithDataAsOrtValue(h->memory, pixels, row * (size_t)height, shape, 4,
                                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, &input),
                        "input tensor") ||
             ort_failed(h, api->Run(h->session, NULL, inputs, (const OrtValue *const *)&input, 1, outputs, n_outputs, values),
                        "pipeline graph");
    if (rc == 0) {
        float *out_map = NULL, *out_score = NULL;
        uint8_t *out_decision = NULL; /* ONNX bool: one byte */
        rc = ort_failed(h, api->GetTensorMutableData(values[0], (void **)&out_map), "anomaly_map") ||
             ort_failed(h, api->GetTensorMutableData(values[1], (void **)&out_score), "score") ||
             (n_outputs == 3 && ort_failed(h, api->GetTensorMutableData(values[2], (void **)&out_decision), "decision"));
        if (rc == 0) {
            result->score = out_score[0];
            result->decision = out_decision ? (out_decision[0] ? 1 : 0) : -1;
            if (map) memcpy(map, out_map, sizeof(float) * (size_t)width * (size_t)height);
        }
    }
    for (size_t i = 0; i < 3; i++)
        if (values[i]) api->ReleaseValue(values[i]);
    if (input) api->ReleaseValue(input);
    free(packed);
    return rc ? -1 : 0;
}

size_t hiad_last_error(hiad_t *h, char *buffer, size_t size) {
    pthread_mutex_lock(&h->lock);
    size_t length = strlen(h->error);
    if (size) snprintf(buffer, size, "%s", h->error);
    pthread_mutex_unlock(&h->lock);
    return length;
}

const char *hiad_runtime_info(const hiad_t *h) { return h->info; }

void hiad_close(hiad_t *h) {
    if (h == NULL) return;
    if (h->api) {
        if (h->memory) h->api->ReleaseMemoryInfo(h->memory);
        if (h->session) h->api->ReleaseSession(h->session);
        if (h->env) h->api->ReleaseEnv(h->env);
    }
    if (h->library) dlclose(h->library);
    pthread_mutex_destroy(&h->lock);
    free(h);
}
