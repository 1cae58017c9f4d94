/* vdbus — `vdbus plug` and `vdbus unplug`. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/size.h"

/* Options that become backend parameters: --OPT VALUE → params[KEY]. */
static const struct { const char *opt, *key; } param_opts[] = {
  { "--size", "size" },
  { "--error-rate", "error-rate" }, { "--error-ops", "error-ops" },
  { "--error-errno", "error-errno" },
  { "--delay-read", "delay-read" }, { "--delay-write", "delay-write" },
  { "--delay-other", "delay-other" }, { "--trace-file", "trace-file" },
  { "--connections", "connections" }, { "--timeout", "timeout" },
  { "--base", "base" }, { "--store", "store" }, { "--chunk-size", "chunk-size" },
  { "--snap", "snap" }, { "--conf", "conf" }, { "--id", "id" }, { "--keyring", "keyring" },
};

/* Backends that take a positional argument, and the parameter it becomes
 * (paths are made absolute). */
static const struct { const char *backend, *key; bool path; } positionals[] = {
  { "file", "path", true }, { "nbd", "uri", false }, { "rbd", "image", false },
};

struct plug_req {
  json_t *args;
  json_t *params;
  const char *positional;
};

static const char *opt_value(int argc, char **argv, int *i)
{
  if (*i + 1 >= argc)
    cli_usage_error("option '%s' needs a value", argv[*i]);
  return argv[++*i];
}

static void check_size(const char *v)
{
  uint64_t sz;
  int r = vdb_size_parse(v, &sz);

  if (r < 0 || sz == 0)
    cli_die("plug", "bad size '%s': %s", v, r == -ERANGE ? "too large" :
            "use a positive number of bytes, optionally with K, M, G or T");
}

/* The daemon has its own working directory: paths are sent absolute. */
static json_t *abs_path(const char *arg)
{
  char abs[PATH_MAX];

  if (arg[0] == '/')
    return json_string(arg);
  if (!getcwd(abs, sizeof abs) || strlen(abs) + strlen(arg) + 2 > sizeof abs)
    cli_die("plug", "cannot make '%s' absolute", arg);
  strcat(abs, "/");
  strcat(abs, arg);
  return json_string(abs);
}

/* --store file:PATH with PATH made absolute. */
static json_t *store_path(const char *path)
{
  json_t *a = abs_path(path);
  char *s;
  json_t *r;

  if (asprintf(&s, "file:%s", json_string_value(a)) < 0)
    cli_die("plug", "out of memory");
  json_decref(a);
  r = json_string(s);
  free(s);
  return r;
}

void cli_check_attach(const char *what, const char *v)
{
  static const char *const modes[] = { "auto", "ublk", "nbd-kernel", "loop", "none" };

  for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++)
    if (strcmp(v, modes[m]) == 0)
      return;
  cli_die(what, "bad attach mode '%s': use auto, ublk, nbd-kernel, loop or none", v);
}

static bool plug_param_opt(struct plug_req *p, int argc, char **argv, int *i)
{
  for (size_t k = 0; k < sizeof param_opts / sizeof param_opts[0]; k++)
    if (strcmp(argv[*i], param_opts[k].opt) == 0) {
      const char *v = opt_value(argc, argv, i);
      if (strcmp(param_opts[k].key, "size") == 0 || strcmp(param_opts[k].key, "chunk-size") == 0)
        check_size(v);
      if (strcmp(param_opts[k].key, "trace-file") == 0 || strcmp(param_opts[k].key, "conf") == 0 ||
          strcmp(param_opts[k].key, "keyring") == 0)
        json_object_set_new(p->params, param_opts[k].key, abs_path(v));
      else if (strcmp(param_opts[k].key, "store") == 0 && strncmp(v, "file:", 5) == 0)
        json_object_set_new(p->params, "store", store_path(v + 5));
      else
        json_object_set_new(p->params, param_opts[k].key, json_string(v));
      return true;
    }
  return false;
}

static void plug_param_kv(struct plug_req *p, const char *kv)
{
  const char *eq = strchr(kv, '=');
  char key[64];

  if (!eq || eq == kv || (size_t)(eq - kv) >= sizeof key)
    cli_usage_error("--param takes KEY=VALUE, not '%s'", kv);
  snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
  json_object_set_new(p->params, key, json_string(eq + 1));
}

static void plug_option(struct plug_req *p, int argc, char **argv, int *i)
{
  const char *a = argv[*i];

  if (plug_param_opt(p, argc, argv, i))
    return;
  if (strcmp(a, "--name") == 0) {
    json_object_set_new(p->args, "name", json_string(opt_value(argc, argv, i)));
  } else if (strcmp(a, "--readonly") == 0 || strcmp(a, "-r") == 0) {
    json_object_set_new(p->args, "readonly", json_true());
  } else if (strcmp(a, "--create") == 0) {
    json_object_set_new(p->params, "create", json_string("1"));
  } else if (strcmp(a, "--no-export") == 0) {
    json_object_set_new(p->args, "export", json_false());
  } else if (strcmp(a, "--block-size") == 0) {
    const char *v = opt_value(argc, argv, i);
    if (strcmp(v, "512") != 0 && strcmp(v, "4096") != 0)
      cli_die("plug", "bad block size '%s': use 512 or 4096", v);
    json_object_set_new(p->args, "block_size", json_integer(atoi(v)));
  } else if (strcmp(a, "--attach") == 0) {
    const char *v = opt_value(argc, argv, i);
    cli_check_attach("plug", v);
    json_object_set_new(p->args, "attach", json_string(v));
  } else if (strcmp(a, "--param") == 0) {
    plug_param_kv(p, opt_value(argc, argv, i));
  } else {
    cli_usage_error("plug: unknown option '%s'", a);
  }
}

/* The positional parameter of a backend the CLI does not know (a plugin),
 * from the daemon's `backends` list; NULL if the backend takes none.  A
 * parameter called "path" is made absolute, as the file backend's. */
static const char *daemon_positional_key(const char *backend, bool *path)
{
  static char key[64];
  json_t *res = cli_call("plug", "backends", NULL), *b;
  const char *k = NULL;
  bool found = false;
  size_t i;

  json_array_foreach(res, i, b)
    if (strcmp(json_string_value(json_object_get(b, "name")), backend) == 0) {
      found = true;
      k = json_string_value(json_object_get(b, "positional"));
      break;
    }
  if (k)
    snprintf(key, sizeof key, "%s", k);
  json_decref(res);
  if (!found)
    cli_die("plug", "no backend named '%s' (see 'vdbus backends')", backend);
  *path = k && strcmp(key, "path") == 0;
  return k ? key : NULL;
}

/* The positional argument of a backend that takes one (file PATH, nbd URI,
 * what a plugin declares). */
static const char *positional_key(const char *backend, bool *path)
{
  for (size_t k = 0; k < sizeof positionals / sizeof positionals[0]; k++)
    if (strcmp(positionals[k].backend, backend) == 0) {
      *path = positionals[k].path;
      return positionals[k].key;
    }
  return daemon_positional_key(backend, path);
}

static void plug_positional(struct plug_req *p, const char *backend, const char *arg)
{
  bool path = false;
  const char *key = positional_key(backend, &path);

  if (!key)
    cli_usage_error("plug %s: unexpected argument '%s'", backend, arg);
  if (p->positional)
    cli_usage_error("plug %s: only one %s, not '%s' too", backend, key, arg);
  p->positional = arg;
  json_object_set_new(p->params, key, path ? abs_path(arg) : json_string(arg));
}

static void plug_print(json_t *d)
{
  printf("%s\n", json_string_value(json_object_get(d, "name")));
}

/* File scope, so that what a usage error exits with is still reachable. */
static struct plug_req p;

int cli_plug(int argc, char **argv)
{
  const char *backend;
  json_t *res;

  if (argc < 2)
    cli_usage_error("plug needs a backend: ram, file, error, delay");
  backend = argv[1];
  p.args = json_object();
  p.params = json_object();
  json_object_set_new(p.args, "backend", json_string(backend));
  for (int i = 2; i < argc; i++) {
    if (argv[i][0] == '-' && argv[i][1])
      plug_option(&p, argc, argv, &i);
    else
      plug_positional(&p, backend, argv[i]);
  }
  if (strcmp(backend, "file") == 0 && !p.positional)
    cli_usage_error("plug file needs a PATH");
  if (strcmp(backend, "nbd") == 0 && !p.positional)
    cli_usage_error("plug nbd needs a URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)");
  json_object_set_new(p.args, "params", p.params);
  res = cli_call("plug", "plug", p.args);
  p.args = p.params = NULL;
  plug_print(res);
  json_decref(res);
  return 0;
}

int cli_unplug(int argc, char **argv)
{
  static json_t *args; /* static: reachable at a usage error's exit */
  const char *name = NULL;
  bool all = false, merge = false;
  json_t *res;

  args = json_object();
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--force") == 0 || strcmp(argv[i], "-f") == 0)
      json_object_set_new(args, "force", json_true());
    else if (strcmp(argv[i], "--all") == 0 || strcmp(argv[i], "-a") == 0)
      all = true;
    else if (strcmp(argv[i], "--merge") == 0)
      merge = true;
    else if (argv[i][0] == '-')
      cli_usage_error("unplug: unknown option '%s'", argv[i]);
    else if (name)
      cli_usage_error("unplug takes one NAME");
    else
      name = argv[i];
  }
  if (all == (name != NULL))
    cli_usage_error("unplug needs a disk NAME or --all");
  if (merge && all)
    cli_usage_error("unplug --merge takes one snapshot NAME, not --all");
  if (all)
    json_object_set_new(args, "all", json_true());
  else
    json_object_set_new(args, "name", json_string(name));
  if (merge)
    json_object_set_new(args, "merge", json_true());
  res = cli_call(name ? name : "unplug", "unplug", args);
  if (merge)
    printf("%s: dropped, %lld bytes merged\n", name,
           (long long)json_integer_value(json_object_get(res, "bytes")));
  json_decref(res);
  return 0;
}
