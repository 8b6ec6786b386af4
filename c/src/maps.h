/* Where hiad-infer writes each input's anomaly map, and the float32 .npy it writes there.
 *
 * An input's key is its path relative to the deepest folder holding all the inputs of the run, extension
 * kept (the Python CLI's rule, hiad_runtime/results.py): `a/m.png` and `b/m.png` get the maps
 * `a/m.png.npy` and `b/m.png.npy` under the map folder, `x.png` and `x.jpg` stay apart, and the files of
 * one folder get `NAME.npy`. Distinct paths get distinct keys, so no map overwrites another.
 */
#ifndef HIAD_MAPS_H
#define HIAD_MAPS_H

/* The n inputs' keys (each malloc'd, as is the array; see free_keys), or NULL when out of memory or
 * the working folder cannot be read. */
char **output_keys(char *const *paths, int n);

void free_keys(char **keys, int n);

/* `path` and every folder above it, as mkdir -p; 0, or -1 with errno set. */
int make_folders(const char *path);

/* `dir/KEY.npy` (its folders created) holding a height x width float32 map; 0, or -1 with errno set. */
int write_map(const char *dir, const char *key, const float *map, int width, int height);

#endif
