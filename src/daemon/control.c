/* vdbus — the control socket: newline-delimited JSON requests and replies
 * on a Unix stream socket (docs/control-protocol.md). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "backends/cow.h"
#include "backends/registry.h"
#include "common/error.h"
#include "common/log.h"
#include "common/size.h"
#include "daemon/daemon.h"
#include "frontends/frontend.h"
#include "frontends/nbd/nbd-server.h"

#define CONTROL_LINE_MAX (1u << 20)

struct control_client {
  struct vdb_watch w;
  struct vdb_loop *loop;
  char *buf;
  size_t len, cap;
};

static struct vdb_watch listen_w = { .fd = -1 };
static struct vdb_loop *control_loop;

static json_t *reply_error(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static json_t *reply_error(int err, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return json_pack("{s:i, s:i, s:s}", "vdbus", VDB_CONTROL_PROTOCOL, "errno", err < 0 ? -err : err,
                   "error", msg);
}

static json_t *reply_errno(int err)
{
  const char *msg = vdb_get_error();
  return reply_error(err, "%s", msg[0] ? msg : strerror(-err));
}

static json_t *reply_result(json_t *result)
{
  return json_pack("{s:i, s:o}", "vdbus", VDB_CONTROL_PROTOCOL, "result", result);
}

static json_t *disk_stats_json(struct vdb_disk *d)
{
  struct vdb_disk_stats *s = &d->stats;

  return json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}",
                   "reads", (json_int_t)s->reads, "writes", (json_int_t)s->writes,
                   "bytes_read", (json_int_t)s->bytes_read,
                   "bytes_written", (json_int_t)s->bytes_written,
                   "flushes", (json_int_t)s->flushes, "trims", (json_int_t)s->trims,
                   "zeroes", (json_int_t)s->zeroes, "caches", (json_int_t)s->caches,
                   "block_status", (json_int_t)s->block_status,
                   "errors", (json_int_t)s->errors, "inflight", (json_int_t)s->inflight);
}

static json_t *disk_caps_json(struct vdb_disk *d)
{
  return json_pack("{s:b, s:b, s:b, s:b, s:b, s:b, s:b, s:b}",
                   "write", d->can_write, "flush", d->can_flush, "fua", d->can_fua,
                   "trim", d->can_trim, "zero", d->can_zero, "fast_zero", d->can_fast_zero,
                   "extents", d->can_extents, "multi_conn", d->can_multi_conn);
}

json_t *vdb_control_disk_json(struct vdb_disk *d, bool with_stats)
{
  char uri[512];
  json_t *params = json_object();
  json_t *o;

  for (int i = 0; i < d->cfg.params.n; i++)
    json_object_set_new(params, d->cfg.params.key[i], json_string(d->cfg.params.val[i]));
  o = json_pack("{s:s, s:s, s:I, s:b, s:i, s:o, s:s, s:o, s:o, s:b, s:s, s:o}",
                "name", d->name, "backend", d->cfg.backend, "size", (json_int_t)d->size,
                "readonly", !vdb_disk_is_writable(d), "block_size", (int)d->block_size,
                "device", d->device[0] ? json_string(d->device) : json_null(),
                "attach", d->cfg.attach,
                "frontend", d->fe ? json_string(d->fe->name) : json_null(),
                "nbd_uri", d->export && vdb_nbd_uri(d, uri, sizeof uri) == 0 ?
                           json_string(uri) : json_null(),
                "export", d->export, "description", d->info.description,
                "params", params);
  json_object_set_new(o, "snapshot", json_boolean(d->cfg.snapshot));
  json_object_set_new(o, "base", d->ops == &vdb_backend_cow ?
                                 json_string(vdb_cow_base(d->handle)->name) : json_null());
  json_object_set_new(o, "overlays", json_integer(atomic_load(&d->dependents)));
  if (with_stats) {
    if (d->fe && d->fe->describe) {
      char desc[256] = "";
      d->fe->describe(d, d->fe_priv, desc, sizeof desc);
      json_object_set_new(o, "frontend_info", json_string(desc));
    }
    json_object_set_new(o, "capabilities", disk_caps_json(d));
    json_object_set_new(o, "stats", disk_stats_json(d));
  }
  return o;
}

/* ---- plug ---- */

static int parse_plug_params(json_t *params, struct vdb_disk_config *cfg)
{
  const char *key;
  json_t *v;

  if (!params)
    return 0;
  if (!json_is_object(params)) {
    vdb_set_error("'params' must be an object");
    return -EINVAL;
  }
  json_object_foreach(params, key, v) {
    char num[32];
    const char *s = json_string_value(v);
    if (json_is_integer(v)) {
      snprintf(num, sizeof num, "%lld", (long long)json_integer_value(v));
      s = num;
    } else if (json_is_boolean(v)) {
      s = json_is_true(v) ? "1" : "0";
    }
    if (!s) {
      vdb_set_error("parameter '%s' must be a string, number or boolean", key);
      return -EINVAL;
    }
    if (vdb_params_set(&cfg->params, key, s) < 0) {
      vdb_set_error("too many parameters");
      return -E2BIG;
    }
  }
  return 0;
}

int vdb_control_parse_plug(json_t *args, struct vdb_disk_config *cfg)
{
  const char *backend = NULL, *name = "", *attach = "auto";
  int readonly = 0, export = 1, bs = 512, snapshot = 0;
  json_t *params = NULL;
  json_error_t jerr;

  memset(cfg, 0, sizeof *cfg);
  if (!args || json_unpack_ex(args, &jerr, JSON_STRICT,
                              "{s:s, s?:s, s?:o, s?:b, s?:i, s?:s, s?:b, s?:b}",
                              "backend", &backend, "name", &name, "params", &params,
                              "readonly", &readonly, "block_size", &bs, "attach", &attach,
                              "export", &export, "snapshot", &snapshot) < 0) {
    vdb_set_error("bad plug request: %s", args ? jerr.text : "no arguments");
    return -EINVAL;
  }
  if (strlen(name) >= sizeof cfg->name || strlen(backend) >= sizeof cfg->backend ||
      strlen(attach) >= sizeof cfg->attach) {
    vdb_set_error("name, backend or attach too long");
    return -EINVAL;
  }
  strcpy(cfg->name, name);
  strcpy(cfg->backend, backend);
  strcpy(cfg->attach, attach);
  cfg->snapshot = snapshot;
  cfg->readonly = readonly; /* a snapshot is read-only by being one */
  cfg->export = export;
  cfg->block_size = bs < 0 ? 0 : (uint32_t)bs;
  if (parse_plug_params(params, cfg) < 0) {
    vdb_params_clear(&cfg->params);
    return -EINVAL;
  }
  if (cfg->readonly)
    vdb_params_set(&cfg->params, "readonly", "1");
  return 0;
}

/* The reply to plug, snapshot and clone: the new disk (reference dropped). */
static json_t *reply_disk(struct vdb_disk *d)
{
  json_t *res = vdb_control_disk_json(d, false);

  vdb_disk_put(d);
  return reply_result(res);
}

static json_t *op_plug(json_t *args)
{
  struct vdb_disk_config cfg;
  struct vdb_disk *d;
  int r = vdb_control_parse_plug(args, &cfg);

  if (r < 0)
    return reply_errno(r);
  r = vdb_bus_plug(&cfg, &d);
  vdb_params_clear(&cfg.params);
  return r < 0 ? reply_errno(r) : reply_disk(d);
}

/* ---- unplug, list, info ---- */

/* One pass over every disk; returns how many were unplugged.  A disk that
 * is the base of overlays waits for the next pass. */
static int unplug_pass(bool force, int *failed, char *first, size_t len)
{
  struct vdb_disk **v;
  int n = vdb_bus_list(&v), done = 0;

  if (n < 0)
    return n;
  *failed = 0;
  for (int i = 0; i < n; i++) {
    char name[VDB_NAME_MAX];
    snprintf(name, sizeof name, "%s", v[i]->name);
    vdb_disk_put(v[i]);
    v[i] = NULL;
    if (vdb_bus_unplug(name, force) == 0)
      done++;
    else if (!(*failed)++)
      snprintf(first, len, "%s", vdb_get_error());
  }
  free(v);
  return done;
}

static json_t *op_unplug_all(bool force)
{
  char first[512] = "";
  int failed = 0, r;

  while ((r = unplug_pass(force, &failed, first, sizeof first)) > 0 && failed > 0)
    ;
  if (r < 0)
    return reply_errno(r);
  if (failed)
    return reply_error(-EBUSY, "%d disk(s) not unplugged: %s", failed, first);
  return reply_result(json_object());
}

static json_t *op_unplug(json_t *args)
{
  const char *name = NULL;
  int force = 0, all = 0, r;
  json_error_t jerr;

  int merge = 0;

  if (!args || json_unpack_ex(args, &jerr, JSON_STRICT, "{s?:s, s?:b, s?:b, s?:b}", "name", &name,
                              "force", &force, "all", &all, "merge", &merge) < 0)
    return reply_error(-EINVAL, "bad unplug request: %s", args ? jerr.text : "no arguments");
  if (merge) {
    uint64_t bytes;
    if (!name || all)
      return reply_error(-EINVAL, "unplug with merge takes one snapshot name");
    r = vdb_bus_merge_snapshot(name, &bytes);
    return r < 0 ? reply_errno(r) : reply_result(json_pack("{s:I}", "bytes", (json_int_t)bytes));
  }
  if (all)
    return op_unplug_all(force);
  if (!name)
    return reply_error(-EINVAL, "unplug needs a disk name (or all)");
  r = vdb_bus_unplug(name, force);
  return r < 0 ? reply_errno(r) : reply_result(json_object());
}

static json_t *op_list(json_t *args)
{
  struct vdb_disk **v;
  int n = vdb_bus_list(&v);
  json_t *a;

  if (n < 0)
    return reply_errno(n);
  a = json_array();
  for (int i = 0; i < n; i++)
    json_array_append_new(a, vdb_control_disk_json(v[i], false));
  vdb_bus_list_free(v, n);
  return reply_result(a);
}

static json_t *op_info(json_t *args)
{
  const char *name = NULL;
  struct vdb_disk *d;
  json_t *o;

  if (!args || json_unpack(args, "{s:s}", "name", &name) < 0)
    return reply_error(-EINVAL, "info needs a disk name");
  if (vdb_bus_get(name, &d) < 0)
    return reply_error(-ENOENT, "no disk named '%s'", name);
  o = vdb_control_disk_json(d, true);
  vdb_disk_put(d);
  return reply_result(o);
}

static json_t *op_backends(json_t *args)
{
  json_t *a = json_array();
  const struct vdb_backend_ops *b;
  const char *origin;

  for (size_t i = 0; (b = vdb_backend_at(i, &origin)); i++)
    json_array_append_new(a, json_pack("{s:s, s:s, s:s, s:b, s:s?, s:s}", "name", b->name,
                                       "summary", b->summary, "usage", b->usage, "volatile",
                                       (b->flags & VDB_BACKEND_VOLATILE) != 0,
                                       "positional", b->positional, "origin", origin));
  return reply_result(a);
}

/* ---- snapshot, clone, commit ---- */

/* The default store of an overlay named name over base: a file in the state
 * directory when the base's data persists, else RAM. */
static void default_store(struct vdb_disk *base, const char *name, char *buf, size_t len)
{
  bool vol = (base->ops->flags & VDB_BACKEND_VOLATILE) || base->info.volatile_data;

  if (vol || snprintf(buf, len, "file:%s/overlays/%s.cow", vdb_bus_settings.state_dir, name) >= (int)len)
    snprintf(buf, len, "ram");
}

static int make_overlay_dir(const char *store)
{
  char dir[600];

  if (strncmp(store, "file:", 5) != 0)
    return 0;
  snprintf(dir, sizeof dir, "%s/overlays", vdb_bus_settings.state_dir);
  if (strncmp(store + 5, dir, strlen(dir)) == 0 && mkdir(dir, 0700) < 0 && errno != EEXIST) {
    vdb_set_error("cannot create %s: %s", dir, strerror(errno));
    return -errno;
  }
  return 0;
}

static json_t *op_snapshot(json_t *args)
{
  const char *name = NULL, *as = "", *store = "", *attach = "none";
  int export = 1, r;
  struct vdb_disk_config scfg;
  struct vdb_disk *d, *s;
  char storebuf[700], snap[VDB_NAME_MAX];
  json_error_t jerr;

  if (!args || json_unpack_ex(args, &jerr, JSON_STRICT, "{s:s, s?:s, s?:s, s?:s, s?:b}", "name",
                              &name, "as", &as, "store", &store, "attach", &attach,
                              "export", &export) < 0)
    return reply_error(-EINVAL, "bad snapshot request: %s", args ? jerr.text : "no arguments");
  if (strlen(as) >= sizeof snap || strlen(attach) >= sizeof scfg.attach ||
      strlen(store) >= sizeof storebuf)
    return reply_error(-EINVAL, "snapshot name, attach mode or store too long");
  if (vdb_bus_get(name, &d) < 0)
    return reply_error(-ENOENT, "no disk named '%s'", name);
  if (as[0]) {
    snprintf(snap, sizeof snap, "%s", as);
  } else {
    char prefix[VDB_NAME_MAX];
    snprintf(prefix, sizeof prefix, "%.*s.snap", VDB_NAME_MAX - 16, name);
    vdb_bus_free_name(prefix, 1, snap, sizeof snap); /* NAME.snapN */
  }
  if (store[0]) {
    snprintf(storebuf, sizeof storebuf, "%s", store);
  } else {
    char over[2 * VDB_NAME_MAX + 2];
    snprintf(over, sizeof over, "%s.%s", name, snap);
    default_store(d, over, storebuf, sizeof storebuf);
  }
  vdb_disk_put(d);
  memset(&scfg, 0, sizeof scfg);
  snprintf(scfg.name, sizeof scfg.name, "%s", snap);
  snprintf(scfg.attach, sizeof scfg.attach, "%s", attach);
  scfg.export = export;
  r = make_overlay_dir(storebuf);
  if (r == 0)
    r = vdb_bus_snapshot(name, &scfg, storebuf, &s);
  return r < 0 ? reply_errno(r) : reply_disk(s);
}

static json_t *op_clone(json_t *args)
{
  const char *name = NULL, *as = "", *store = "", *attach = "auto";
  int export = 1, readonly = 0, r;
  struct vdb_disk_config cfg;
  struct vdb_disk *base, *d;
  char storebuf[700];
  json_error_t jerr;

  if (!args || json_unpack_ex(args, &jerr, JSON_STRICT, "{s:s, s?:s, s?:s, s?:s, s?:b, s?:b}",
                              "name", &name, "as", &as, "store", &store, "attach", &attach,
                              "export", &export, "readonly", &readonly) < 0)
    return reply_error(-EINVAL, "bad clone request: %s", args ? jerr.text : "no arguments");
  if (strlen(as) >= sizeof cfg.name || strlen(attach) >= sizeof cfg.attach ||
      strlen(store) >= sizeof storebuf)
    return reply_error(-EINVAL, "clone name, attach mode or store too long");
  if (vdb_bus_get(name, &base) < 0)
    return reply_error(-ENOENT, "no disk named '%s'", name);
  memset(&cfg, 0, sizeof cfg);
  snprintf(cfg.backend, sizeof cfg.backend, "cow");
  snprintf(cfg.attach, sizeof cfg.attach, "%s", attach);
  cfg.block_size = base->block_size;
  cfg.export = export;
  cfg.readonly = readonly;
  if (as[0]) {
    snprintf(cfg.name, sizeof cfg.name, "%s", as);
  } else {
    /* A clone needs its name before its store: the name plug would pick. */
    vdb_bus_free_name("vd", 0, cfg.name, sizeof cfg.name);
  }
  if (store[0])
    snprintf(storebuf, sizeof storebuf, "%s", store);
  else
    default_store(base, cfg.name, storebuf, sizeof storebuf);
  vdb_disk_put(base);
  r = make_overlay_dir(storebuf);
  if (r == 0 && (vdb_params_set(&cfg.params, "base", name) < 0 ||
                 vdb_params_set(&cfg.params, "store", storebuf) < 0 ||
                 (readonly && vdb_params_set(&cfg.params, "readonly", "1") < 0)))
    r = -ENOMEM;
  if (r == 0)
    r = vdb_bus_plug(&cfg, &d);
  vdb_params_clear(&cfg.params);
  return r < 0 ? reply_errno(r) : reply_disk(d);
}

static json_t *op_commit(json_t *args)
{
  const char *name = NULL;
  uint64_t bytes = 0;
  int r;

  if (!args || json_unpack(args, "{s:s}", "name", &name) < 0)
    return reply_error(-EINVAL, "commit needs a disk name");
  r = vdb_bus_commit(name, &bytes);
  if (r < 0)
    return reply_errno(r);
  return reply_result(json_pack("{s:I}", "bytes", (json_int_t)bytes));
}

static json_t *op_hello(json_t *args)
{
  return reply_result(json_pack("{s:s, s:i}", "version", VDB_VERSION,
                                "protocol", VDB_CONTROL_PROTOCOL));
}

static const struct {
  const char *name;
  json_t *(*fn)(json_t *args);
} control_ops[] = {
  { "hello", op_hello }, { "plug", op_plug }, { "unplug", op_unplug },
  { "list", op_list }, { "info", op_info }, { "backends", op_backends },
  { "snapshot", op_snapshot }, { "clone", op_clone }, { "commit", op_commit },
};

json_t *vdb_control_handle(json_t *req)
{
  const char *op = NULL;
  json_t *args = NULL;
  int version = VDB_CONTROL_PROTOCOL;

  vdb_clear_error();
  if (!json_is_object(req) ||
      json_unpack(req, "{s:s, s?:o, s?:i}", "op", &op, "args", &args, "vdbus", &version) < 0)
    return reply_error(-EINVAL, "a request is an object with a string 'op'");
  if (version != VDB_CONTROL_PROTOCOL)
    return reply_error(-EPROTO, "protocol version %d is not supported (this daemon speaks %d)",
                       version, VDB_CONTROL_PROTOCOL);
  for (size_t i = 0; i < sizeof control_ops / sizeof control_ops[0]; i++)
    if (strcmp(op, control_ops[i].name) == 0) {
      vdb_dbg(VDB_DBG_CONTROL, "control: %s", op);
      return control_ops[i].fn(args);
    }
  return reply_error(-EOPNOTSUPP, "unknown operation '%s'", op);
}

/* ---- the socket ---- */

static void client_close(struct control_client *c)
{
  vdb_loop_unwatch(c->loop, &c->w);
  close(c->w.fd);
  free(c->buf);
  free(c);
}

static int client_send(struct control_client *c, const char *s, size_t len)
{
  while (len > 0) {
    ssize_t n = send(c->w.fd, s, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EAGAIN) {
      struct pollfd p = { c->w.fd, POLLOUT, 0 };
      if (poll(&p, 1, 5000) <= 0)
        return -ETIMEDOUT;
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return -errno;
    s += n;
    len -= (size_t)n;
  }
  return 0;
}

static int client_handle_line(struct control_client *c, const char *line, size_t len)
{
  json_error_t jerr;
  json_t *req = json_loadb(line, len, 0, &jerr);
  json_t *reply;
  char *out;
  int r;

  reply = req ? vdb_control_handle(req) : reply_error(-EINVAL, "bad JSON: %s", jerr.text);
  json_decref(req);
  out = json_dumps(reply, JSON_COMPACT);
  json_decref(reply);
  if (!out)
    return -ENOMEM;
  r = client_send(c, out, strlen(out));
  if (r == 0)
    r = client_send(c, "\n", 1);
  free(out);
  return r;
}

/* Returns 0 to keep the client, -errno to drop it. */
static int client_process(struct control_client *c)
{
  size_t start = 0;
  char *nl;
  int r;

  while ((nl = memchr(c->buf + start, '\n', c->len - start))) {
    size_t n = (size_t)(nl - (c->buf + start));
    if (n > 0 && (r = client_handle_line(c, c->buf + start, n)) < 0)
      return r;
    start += n + 1;
  }
  memmove(c->buf, c->buf + start, c->len - start);
  c->len -= start;
  return c->len >= CONTROL_LINE_MAX ? -EMSGSIZE : 0;
}

static void client_cb(struct vdb_watch *w, uint32_t revents)
{
  struct control_client *c = w->arg;
  ssize_t n;

  if (c->cap - c->len < 4096) {
    size_t cap = c->cap ? c->cap * 2 : 8192;
    char *b = realloc(c->buf, cap);
    if (!b) {
      client_close(c);
      return;
    }
    c->buf = b;
    c->cap = cap;
  }
  n = recv(w->fd, c->buf + c->len, c->cap - c->len, 0);
  if (n < 0 && (errno == EAGAIN || errno == EINTR))
    return;
  if (n <= 0) {
    client_close(c);
    return;
  }
  c->len += (size_t)n;
  if (client_process(c) < 0)
    client_close(c);
}

static void listen_cb(struct vdb_watch *w, uint32_t revents)
{
  int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  struct control_client *c;

  if (fd < 0)
    return;
  c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    return;
  }
  c->loop = control_loop;
  c->w = (struct vdb_watch){ .fd = fd, .events = EPOLLIN, .cb = client_cb, .arg = c };
  if (vdb_loop_watch(control_loop, &c->w) < 0) {
    close(fd);
    free(c);
  }
}

int vdb_control_listen(struct vdb_loop *loop, const char *path)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd, r;
  mode_t old;

  if (strlen(path) >= sizeof sa.sun_path) {
    vdb_set_error("control socket path too long: %s", path);
    return -ENAMETOOLONG;
  }
  strcpy(sa.sun_path, path);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  unlink(path);
  old = umask(0177);
  r = bind(fd, (struct sockaddr *)&sa, sizeof sa);
  umask(old);
  if (r < 0 || chmod(path, 0600) < 0 || listen(fd, 64) < 0) {
    r = -errno;
    vdb_set_error("control socket %s: %s", path, strerror(errno));
    close(fd);
    return r;
  }
  control_loop = loop;
  listen_w = (struct vdb_watch){ .fd = fd, .events = EPOLLIN, .cb = listen_cb };
  return vdb_loop_watch(loop, &listen_w);
}

void vdb_control_close(void)
{
  if (listen_w.fd >= 0) {
    vdb_loop_unwatch(control_loop, &listen_w);
    close(listen_w.fd);
    listen_w.fd = -1;
  }
}
