/* vdbus — the registry of backends: the in-tree table (explicit, no
 * constructor tricks) and the backends registered from plugins (plugin.c).
 * The in-tree backends obey the same rules as plugins: a unit test checks
 * them with vdb_backend_ops_check(). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dlfcn.h>

#include "backends/cow.h"
#include "backends/registry.h"

static const struct vdb_backend_ops *const vdb_backends[] = {
  &vdb_backend_ram,
  &vdb_backend_file,
  &vdb_backend_nbd,
  &vdb_backend_error,
  &vdb_backend_delay,
  &vdb_backend_trace,
  &vdb_backend_cow,
#ifdef VDB_HAVE_RBD
  &vdb_backend_rbd,
#endif
  NULL,
};

/* A backend registered from a plugin. */
struct backend_plugin {
  struct vdb_backend_ops ops; /* the plugin's ops widened to the current size */
  char *origin;               /* the shared object's path */
  void *dl;                   /* dlopen handle, or NULL */
};

static struct backend_plugin **plugins; /* in load order */
static size_t nplugins;

/* Size of the ops struct up to the end of the last field of each API
 * version: the smallest struct_size a backend of that version may have. */
static const size_t ops_min_size[] = {
  [1] = offsetof(struct vdb_backend_ops, flags) + sizeof(uint32_t),
  [2] = offsetof(struct vdb_backend_ops, snapshot) + sizeof(void (*)(void)),
  [3] = offsetof(struct vdb_backend_ops, write_direct) + sizeof(void (*)(void)),
};
_Static_assert(sizeof ops_min_size / sizeof ops_min_size[0] == VDB_BACKEND_API_VERSION + 1,
               "ops_min_size needs the size of every API version");
#define OPS_KNOWN_FLAGS VDB_BACKEND_VOLATILE
/* A struct_size past this is not a struct anybody wrote. */
#define OPS_MAX_SIZE 4096u
/* Backend names fit struct vdb_disk_config.backend[32]. */
#define NAME_MAX_LEN 31

static size_t builtin_count(void)
{
  return sizeof vdb_backends / sizeof vdb_backends[0] - 1;
}

const struct vdb_backend_ops *vdb_backend_at(size_t i, const char **origin)
{
  size_t nb = builtin_count();

  if (i < nb) {
    if (origin)
      *origin = VDB_BACKEND_ORIGIN_BUILTIN;
    return vdb_backends[i];
  }
  if (i - nb >= nplugins)
    return NULL;
  if (origin)
    *origin = plugins[i - nb]->origin;
  return &plugins[i - nb]->ops;
}

/* The backend called name and its origin. */
static const struct vdb_backend_ops *backend_lookup(const char *name, const char **origin)
{
  const struct vdb_backend_ops *ops;

  for (size_t i = 0; (ops = vdb_backend_at(i, origin)); i++)
    if (strcmp(ops->name, name) == 0)
      return ops;
  return NULL;
}

const struct vdb_backend_ops *vdb_backend_find(const char *name)
{
  return backend_lookup(name, NULL);
}

/* A backend or parameter name: 1 to NAME_MAX_LEN of [a-z0-9_-], not
 * starting with '-'.  Returns NULL or what is wrong with it. */
static const char *name_problem(const char *s)
{
  size_t n = strlen(s);

  if (n == 0)
    return "is empty";
  if (n > NAME_MAX_LEN)
    return "is longer than 31 characters";
  if (s[0] == '-')
    return "starts with '-'";
  if (strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789_-") != n)
    return "has characters other than a-z, 0-9, '_' and '-'";
  return NULL;
}

/* Valid UTF-8 (the control protocol is JSON), without control characters
 * other than newline and tab. */
static bool text_ok(const char *s)
{
  const unsigned char *p = (const unsigned char *)s;

  while (*p) {
    int n = *p < 0x80 ? 0 : (*p & 0xe0) == 0xc0 && *p >= 0xc2 ? 1 : (*p & 0xf0) == 0xe0 ? 2 :
            (*p & 0xf8) == 0xf0 && *p <= 0xf4 ? 3 : -1;
    if (n < 0 || (n == 0 && *p < 0x20 && *p != '\n' && *p != '\t'))
      return false;
    p++;
    for (int i = 0; i < n; i++, p++)
      if ((*p & 0xc0) != 0x80)
        return false;
  }
  return true;
}

/* The size and version fields: the part of the check that decides how
 * many bytes of ops may be read. */
static int ops_check_version(const struct vdb_backend_ops *ops, char *why, size_t len)
{
  const uint8_t *tail = (const uint8_t *)ops + sizeof *ops;

  if (ops->api_version < 1 || ops->api_version > VDB_BACKEND_API_VERSION) {
    snprintf(why, len, "API version %u (this vdbusd supports 1 to %u)", ops->api_version,
             VDB_BACKEND_API_VERSION);
    return -EINVAL;
  }
  if (ops->struct_size < ops_min_size[ops->api_version]) {
    snprintf(why, len, "struct_size %u is smaller than the API version %u ops struct (%zu bytes)",
             ops->struct_size, ops->api_version, ops_min_size[ops->api_version]);
    return -EINVAL;
  }
  if (ops->struct_size > OPS_MAX_SIZE) {
    snprintf(why, len, "struct_size %u is implausible (more than %u bytes)", ops->struct_size,
             OPS_MAX_SIZE);
    return -EINVAL;
  }
  for (size_t i = 0; i + sizeof *ops < ops->struct_size; i++)
    if (tail[i]) {
      snprintf(why, len, "struct_size %u: fields past byte %zu, unknown to this vdbusd, are set "
               "(it needs a newer vdbusd)", ops->struct_size, sizeof *ops);
      return -EINVAL;
    }
  return 0;
}

/* The rest of the rules, on a copy widened to the current size. */
static int ops_check_fields(const struct vdb_backend_ops *o, char *why, size_t len)
{
  const char *p;

  if (!o->name) {
    snprintf(why, len, "no name");
    return -EINVAL;
  }
  if ((p = name_problem(o->name))) {
    snprintf(why, len, "backend name '%.40s' %s", o->name, p);
    return -EINVAL;
  }
  if (!o->summary || !o->usage) {
    snprintf(why, len, "backend '%s' has no %s", o->name, o->summary ? "usage" : "summary");
    return -EINVAL;
  }
  if (!text_ok(o->summary) || !text_ok(o->usage)) {
    snprintf(why, len, "backend '%s': its %s is not UTF-8 text", o->name,
             text_ok(o->summary) ? "usage" : "summary");
    return -EINVAL;
  }
  if (o->positional && (p = name_problem(o->positional))) {
    snprintf(why, len, "backend '%s': positional parameter name '%.40s' %s", o->name,
             o->positional, p);
    return -EINVAL;
  }
  if (!o->open || !o->close || !o->read) {
    snprintf(why, len, "backend '%s' has no %s callback (open, close and read are required)",
             o->name, !o->open ? "open" : !o->close ? "close" : "read");
    return -EINVAL;
  }
  if (o->flags & ~OPS_KNOWN_FLAGS) {
    snprintf(why, len, "backend '%s' has unknown flags %#x", o->name, o->flags & ~OPS_KNOWN_FLAGS);
    return -EINVAL;
  }
  return 0;
}

/* Copy the first struct_size bytes of ops (at most the current size) into
 * a zeroed current-size struct. */
static void ops_widen(const struct vdb_backend_ops *ops, struct vdb_backend_ops *out)
{
  size_t n = ops->struct_size < sizeof *out ? ops->struct_size : sizeof *out;

  memset(out, 0, sizeof *out);
  memcpy(out, ops, n);
}

int vdb_backend_ops_check(const struct vdb_backend_ops *ops, char *why, size_t len)
{
  struct vdb_backend_ops o;
  int r;

  if (!ops) {
    snprintf(why, len, "no ops table (NULL)");
    return -EINVAL;
  }
  if ((r = ops_check_version(ops, why, len)) < 0)
    return r;
  ops_widen(ops, &o);
  return ops_check_fields(&o, why, len);
}

int vdb_backend_register(const struct vdb_backend_ops *ops, const char *origin, void *dl,
                         char *why, size_t len)
{
  struct backend_plugin *p, **v;
  const char *taken_by;
  bool builtin;
  int r;

  if ((r = vdb_backend_ops_check(ops, why, len)) < 0)
    return r;
  if (backend_lookup(ops->name, &taken_by)) {
    builtin = strcmp(taken_by, VDB_BACKEND_ORIGIN_BUILTIN) == 0;
    snprintf(why, len, "backend name '%s' is taken by %s%s", ops->name,
             builtin ? "the built-in backend" : "the plugin ", builtin ? "" : taken_by);
    return -EEXIST;
  }
  p = calloc(1, sizeof *p);
  v = realloc(plugins, (nplugins + 1) * sizeof *plugins);
  if (v)
    plugins = v;
  if (!p || !v || !(p->origin = strdup(origin))) {
    free(p);
    snprintf(why, len, "out of memory");
    return -ENOMEM;
  }
  ops_widen(ops, &p->ops);
  p->dl = dl;
  plugins[nplugins++] = p;
  return 0;
}

void vdb_backend_plugins_unload(void)
{
  for (size_t i = 0; i < nplugins; i++) {
    if (plugins[i]->dl)
      dlclose(plugins[i]->dl);
    free(plugins[i]->origin);
    free(plugins[i]);
  }
  free(plugins);
  plugins = NULL;
  nplugins = 0;
}
