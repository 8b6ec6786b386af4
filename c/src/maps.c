/* Map keys and the .npy writer of hiad-infer; see maps.h. */
#include "maps.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* `path` made absolute against `cwd` with `.`, `..` and repeated slashes resolved by name, as
 * Python's os.path.abspath does (symlinks are not followed: a key names the path as given). */
static char *absolute(const char *path, const char *cwd) {
    size_t size = strlen(cwd) + strlen(path) + 3;
    char *joined = malloc(size), *out = malloc(size);
    if (joined == NULL || out == NULL) {
        free(joined);
        free(out);
        return NULL;
    }
    snprintf(joined, size, "%s/%s", path[0] == '/' ? "" : cwd, path);
    size_t n = 0; /* out[0..n) is "/a/b" (the root is "") */
    for (char *part = strtok(joined, "/"); part != NULL; part = strtok(NULL, "/")) {
        if (strcmp(part, ".") == 0) continue;
        if (strcmp(part, "..") == 0) {
            while (n > 0 && out[--n] != '/') {}
            continue;
        }
        n += (size_t)sprintf(out + n, "/%s", part);
    }
    if (n == 0) out[n++] = '/';
    out[n] = '\0';
    free(joined);
    return out;
}

/* Whether the folder `dir` (no trailing slash; the root is "") is `common` or lies below it. */
static int below(const char *dir, size_t dir_length, const char *common, size_t length) {
    return dir_length >= length && strncmp(dir, common, length) == 0 && (dir_length == length || dir[length] == '/');
}

char **output_keys(char *const *paths, int n) {
    char cwd[PATH_MAX];
    char **keys = calloc((size_t)n, sizeof *keys), **full = calloc((size_t)n, sizeof *full);
    int ok = keys != NULL && full != NULL && getcwd(cwd, sizeof cwd) != NULL;
    for (int i = 0; ok && i < n; i++) ok = (full[i] = absolute(paths[i], cwd)) != NULL;
    size_t common = 0; /* the deepest common folder is full[0][0..common) */
    for (int i = 0; ok && i < n; i++) {
        size_t dir = (size_t)(strrchr(full[i], '/') - full[i]);
        if (i == 0) common = dir;
        while (!below(full[i], dir, full[0], common))
            while (full[0][--common] != '/') {} /* up one folder (full[0][0] is '/') */
    }
    for (int i = 0; ok && i < n; i++) ok = (keys[i] = strdup(full[i] + common + 1)) != NULL;
    for (int i = 0; full && i < n; i++) free(full[i]);
    free(full);
    if (!ok) {
        free_keys(keys, n);
        return NULL;
    }
    return keys;
}

void free_keys(char **keys, int n) {
    for (int i = 0; keys && i < n; i++) free(keys[i]);
    free(keys);
}

int make_folders(const char *path) {
    char *p = strdup(path);
    if (p == NULL) return -1;
    int rc = 0;
    for (char *end = p + 1; rc == 0 && end[-1] != '\0'; end++) { /* each prefix that ends before a '/' or at the end */
        if (*end != '/' && *end != '\0') continue;
        char kept = *end;
        *end = '\0';
        if (mkdir(p, 0777) && errno != EEXIST) rc = -1;
        *end = kept;
    }
    struct stat st;
    if (rc == 0 && stat(p, &st) != 0) {
        rc = -1;
    } else if (rc == 0 && !S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        rc = -1;
    }
    free(p);
    return rc;
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
    size_t count = (size_t)width * (size_t)height;
    int ok = fwrite("\x93NUMPY\x01\x00", 1, 8, f) == 8 && fwrite(&length, 2, 1, f) == 1 &&
             fwrite(header, 1, (size_t)length, f) == length && fwrite(data, sizeof(float), count, f) == count;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

int write_map(const char *dir, const char *key, const float *map, int width, int height) {
    size_t size = strlen(dir) + strlen(key) + 6;
    char *path = malloc(size);
    if (path == NULL) return -1;
    snprintf(path, size, "%s/%s", dir, key);
    char *slash = strrchr(path, '/');
    *slash = '\0';
    int rc = make_folders(path);
    snprintf(path, size, "%s/%s.npy", dir, key);
    if (rc == 0) rc = write_npy(path, map, width, height);
    free(path);
    return rc;
}
