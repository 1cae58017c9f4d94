/* vdbus — the persisted bus state, <state-dir>/bus.json.
 *
 * Written on every change (temp file, fsync, rename, fsync of the
 * directory); read at start to plug persistent disks back with the same
 * names and settings.  Disks of volatile backends (RAM) are not kept.  An
 * entry that cannot be plugged back is kept in the file (and logged) so it
 * is not lost by the next save. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/registry.h"
#include "common/error.h"
#include "common/log.h"
#include "daemon/daemon.h"

#define STATE_VERSION 1

static json_t *unrestored; /* entries that failed to plug back */

static void state_path(char *buf, size_t len, const char *suffix)
{
  snprintf(buf, len, "%s/bus.json%s", vdb_bus_settings.state_dir, suffix);
}

static json_t *state_disk_json(struct vdb_disk *d)
{
  json_t *params = json_object();

  for (int i = 0; i < d->cfg.params.n; i++)
    if (strcmp(d->cfg.params.key[i], "create") != 0) /* never re-create at restart */
      json_object_set_new(params, d->cfg.params.key[i], json_string(d->cfg.params.val[i]));
  json_t *o = json_pack("{s:s, s:s, s:o, s:b, s:i, s:s, s:b}", "name", d->name,
                        "backend", d->cfg.backend, "params", params, "readonly", d->cfg.readonly,
                        "block_size", (int)d->cfg.block_size, "attach", d->cfg.attach,
                        "export", d->cfg.export);
  if (o && d->cfg.snapshot)
    json_object_set_new(o, "snapshot", json_true());
  if (o && d->cfg.fe_state[0])
    json_object_set_new(o, "frontend_state", json_string(d->cfg.fe_state));
  return o;
}

static int state_write_file(const char *tmp, const char *text)
{
  size_t len = strlen(text);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int r = 0;

  if (fd < 0)
    return -errno;
  if (write(fd, text, len) != (ssize_t)len || write(fd, "\n", 1) != 1)
    r = errno ? -errno : -EIO;
  if (r == 0 && fsync(fd) < 0)
    r = -errno;
  close(fd);
  return r;
}

int vdb_state_save(void)
{
  char tmp[512], path[512];
  struct vdb_disk **v;
  json_t *disks = json_array(), *root;
  char *text;
  int n = vdb_bus_list(&v), r, dfd;

  if (n < 0)
    return n;
  for (int i = 0; i < n; i++)
    if (!(v[i]->ops->flags & VDB_BACKEND_VOLATILE) && !v[i]->info.volatile_data)
      json_array_append_new(disks, state_disk_json(v[i]));
  vdb_bus_list_free(v, n);
  if (unrestored)
    json_array_extend(disks, unrestored);
  root = json_pack("{s:i, s:o}", "version", STATE_VERSION, "disks", disks);
  text = json_dumps(root, JSON_INDENT(2));
  json_decref(root);
  if (!text)
    return -ENOMEM;
  state_path(tmp, sizeof tmp, ".tmp");
  state_path(path, sizeof path, "");
  r = state_write_file(tmp, text);
  free(text);
  if (r == 0 && rename(tmp, path) < 0)
    r = -errno;
  if (r < 0) {
    vdb_err("cannot save bus state to %s: %s", path, strerror(-r));
    unlink(tmp);
    return r;
  }
  dfd = open(vdb_bus_settings.state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return 0;
}

/* Plug one saved disk back: 0, or -errno with vdb_set_error(). */
static int state_restore_one(json_t *entry)
{
  struct vdb_disk_config cfg;
  json_t *copy = json_deep_copy(entry);
  int r;

  /* The saved form is a plug request's arguments plus what the frontend
   * needs to take its device back. */
  const char *fes = json_string_value(json_object_get(copy, "frontend_state"));
  char fe_state[sizeof cfg.fe_state] = "";
  if (fes)
    snprintf(fe_state, sizeof fe_state, "%s", fes);
  json_object_del(copy, "frontend_state");
  r = vdb_control_parse_plug(copy, &cfg);
  json_decref(copy);
  if (r < 0)
    return r;
  memcpy(cfg.fe_state, fe_state, sizeof fe_state);
  r = vdb_bus_plug(&cfg, NULL);
  vdb_params_clear(&cfg.params);
  return r;
}

/* Does the entry layer over a disk that is not plugged (yet)? */
static bool state_base_missing(json_t *entry)
{
  const char *base = json_string_value(json_object_get(json_object_get(entry, "params"), "base"));
  struct vdb_disk *d;

  if (!base || strcmp(json_string_value(json_object_get(entry, "backend")) ?: "", "cow") != 0)
    return false;
  if (vdb_bus_get(base, &d) < 0)
    return true;
  vdb_disk_put(d);
  return false;
}

/* Overlays come back after their bases: passes until nothing more plugs. */
static void state_restore(json_t *disks)
{
  size_t n = json_array_size(disks), left = n;
  bool *done = calloc(n ? n : 1, sizeof *done);
  bool progress = true;

  if (!done)
    return;
  while (left > 0 && progress) {
    progress = false;
    for (size_t i = 0; i < n; i++) {
      json_t *e = json_array_get(disks, i);
      if (done[i] || state_base_missing(e))
        continue;
      done[i] = true;
      left--;
      progress = true;
      if (state_restore_one(e) < 0) {
        vdb_err("bus state: disk #%zu (%s) not restored: %s", i,
                json_string_value(json_object_get(e, "name")), vdb_get_error());
        if (!unrestored)
          unrestored = json_array();
        json_array_append(unrestored, e);
      }
    }
  }
  for (size_t i = 0; i < n; i++)
    if (!done[i]) {
      json_t *e = json_array_get(disks, i);
      vdb_err("bus state: disk #%zu (%s) not restored: its base '%s' is not there", i,
              json_string_value(json_object_get(e, "name")),
              json_string_value(json_object_get(json_object_get(e, "params"), "base")));
      if (!unrestored)
        unrestored = json_array();
      json_array_append(unrestored, e);
    }
  free(done);
}

int vdb_state_load(void)
{
  char path[512];
  json_error_t jerr;
  json_t *root, *disks;
  int version = 0;

  state_path(path, sizeof path, "");
  if (access(path, F_OK) < 0 && errno == ENOENT)
    return 0;
  root = json_load_file(path, 0, &jerr);
  if (!root) {
    vdb_set_error("bus state %s is unreadable or corrupt (line %d: %s); "
                  "fix or move it away to start with an empty bus",
                  path, jerr.line, jerr.text);
    return -EINVAL;
  }
  if (json_unpack_ex(root, &jerr, 0, "{s:i, s:o}", "version", &version, "disks", &disks) < 0 ||
      version != STATE_VERSION || !json_is_array(disks)) {
    vdb_set_error("bus state %s is not a version %d vdbus state file (%s); "
                  "fix or move it away to start with an empty bus",
                  path, STATE_VERSION, jerr.text);
    json_decref(root);
    return -EINVAL;
  }
  state_restore(disks);
  json_decref(root);
  return 0;
}
