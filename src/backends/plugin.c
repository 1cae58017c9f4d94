/* vdbus — loading backends from plugins: every "*.so" in a plugin
 * directory is dlopen'ed and asked for its ops table through its entry
 * point, vdb_backend_plugin_init() (see <vdbus/backend.h>).  What the table
 * must satisfy is checked by the registry (registry.c).
 *
 * A plugin that cannot be opened, has no entry point, declines or is
 * refused is skipped with one warning naming its path and the reason; the
 * daemon carries on.  (Code that a plugin runs when it is loaded — its ELF
 * constructors and its entry point — runs inside vdbusd: a plugin that
 * crashes there takes the daemon down, as a built-in backend would.) */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backends/registry.h"
#include "common/error.h"
#include "common/log.h"

typedef const struct vdb_backend_ops *(*plugin_init_fn)(uint32_t bus_api_version);

static int plugin_filter(const struct dirent *e)
{
  size_t n = strlen(e->d_name);

  return e->d_name[0] != '.' && n > 3 && strcmp(e->d_name + n - 3, ".so") == 0;
}

/* Open the shared object at path and register its backend.  Returns 0 or
 * -errno after logging why the plugin is skipped. */
static int plugin_load(const char *path)
{
  const struct vdb_backend_ops *ops;
  plugin_init_fn init;
  struct stat st;
  char why[512];
  void *dl;
  int r;

  if (stat(path, &st) < 0) {
    r = -errno;
    vdb_warn("plugin %s: skipped: %s", path, strerror(-r));
    return r;
  }
  if (!S_ISREG(st.st_mode)) {
    vdb_warn("plugin %s: skipped: not a regular file", path);
    return -EINVAL;
  }
  dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!dl) {
    vdb_warn("plugin %s: skipped: cannot load it: %s", path, dlerror());
    return -EINVAL;
  }
  init = (plugin_init_fn)dlsym(dl, VDB_BACKEND_PLUGIN_INIT_NAME);
  if (!init) {
    vdb_warn("plugin %s: skipped: no entry point %s() (define it with VDB_BACKEND_PLUGIN)",
             path, VDB_BACKEND_PLUGIN_INIT_NAME);
    dlclose(dl);
    return -EINVAL;
  }
  vdb_clear_error();
  ops = init(VDB_BACKEND_API_VERSION);
  if (!ops) {
    vdb_warn("plugin %s: skipped: %s() declined%s%s", path, VDB_BACKEND_PLUGIN_INIT_NAME,
             vdb_get_error()[0] ? ": " : " (returned NULL)", vdb_get_error());
    dlclose(dl);
    return -EINVAL;
  }
  r = vdb_backend_register(ops, path, dl, why, sizeof why);
  if (r < 0) {
    vdb_warn("plugin %s: skipped: %s", path, why);
    dlclose(dl);
    return r;
  }
  vdb_info("plugin %s: backend '%s' (API version %u)", path, ops->name, ops->api_version);
  return 0;
}

int vdb_backend_plugins_load(const char *dir, bool required)
{
  struct dirent **names;
  char path[PATH_MAX + NAME_MAX + 2], *abs;
  int n, loaded = 0;

  /* Absolute, so that a backend's origin says where it came from. */
  if (!(abs = realpath(dir, NULL)) || (n = scandir(abs, &names, plugin_filter, alphasort)) < 0) {
    int e = errno;
    free(abs);
    if (e == ENOENT && !required)
      return 0;
    vdb_set_error("plugin directory %s: %s", dir, strerror(e));
    return -e;
  }
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/%s", strcmp(abs, "/") == 0 ? "" : abs, names[i]->d_name);
    if (plugin_load(path) == 0)
      loaded++;
    free(names[i]);
  }
  free(names);
  vdb_dbg(VDB_DBG_BUS, "plugin directory %s: %d backends", abs, loaded);
  free(abs);
  return loaded;
}
