/* vdbus — `vdbus snapshot`, `vdbus clone` and `vdbus commit`. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"

static const char *layer_value(int argc, char **argv, int *i)
{
  if (*i + 1 >= argc)
    cli_usage_error("option '%s' needs a value", argv[*i]);
  return argv[++*i];
}

/* --store ram | file:PATH (PATH made absolute: the daemon has its own cwd). */
static json_t *layer_store(const char *what, const char *v)
{
  char abs[PATH_MAX + 8];

  if (strcmp(v, "ram") == 0)
    return json_string(v);
  if (strncmp(v, "file:", 5) != 0 || !v[5])
    cli_die(what, "bad store '%s': use ram or file:PATH", v);
  if (v[5] == '/')
    return json_string(v);
  strcpy(abs, "file:");
  if (!getcwd(abs + 5, PATH_MAX) || strlen(abs) + strlen(v + 5) + 2 > sizeof abs)
    cli_die(what, "cannot make '%s' absolute", v + 5);
  strcat(abs, "/");
  strcat(abs, v + 5);
  return json_string(abs);
}

/* The options snapshot and clone share; false if argv[*i] is not one. */
static bool layer_option(const char *what, json_t *args, int argc, char **argv, int *i)
{
  const char *a = argv[*i];

  if (strcmp(a, "--as") == 0 || strcmp(a, "--name") == 0) {
    json_object_set_new(args, "as", json_string(layer_value(argc, argv, i)));
  } else if (strcmp(a, "--store") == 0) {
    json_object_set_new(args, "store", layer_store(what, layer_value(argc, argv, i)));
  } else if (strcmp(a, "--attach") == 0) {
    const char *v = layer_value(argc, argv, i);
    cli_check_attach(what, v);
    json_object_set_new(args, "attach", json_string(v));
  } else if (strcmp(a, "--no-export") == 0) {
    json_object_set_new(args, "export", json_false());
  } else {
    return false;
  }
  return true;
}

/* File scope: reachable when a usage error exits. */
static json_t *layer_args;

static int layer_command(const char *verb, int argc, char **argv, bool clone)
{
  const char *name = NULL;
  json_t *res;

  layer_args = json_object();
  for (int i = 1; i < argc; i++) {
    if (argv[i][0] == '-' && argv[i][1]) {
      if (layer_option(verb, layer_args, argc, argv, &i))
        continue;
      if (clone && (strcmp(argv[i], "--readonly") == 0 || strcmp(argv[i], "-r") == 0)) {
        json_object_set_new(layer_args, "readonly", json_true());
        continue;
      }
      cli_usage_error("%s: unknown option '%s'", verb, argv[i]);
    }
    if (name)
      cli_usage_error("%s takes one disk NAME", verb);
    name = argv[i];
  }
  if (!name)
    cli_usage_error("%s needs a disk NAME", verb);
  json_object_set_new(layer_args, "name", json_string(name));
  res = cli_call(name, verb, layer_args);
  layer_args = NULL;
  printf("%s\n", json_string_value(json_object_get(res, "name")));
  json_decref(res);
  return 0;
}

int cli_snapshot(int argc, char **argv)
{
  return layer_command("snapshot", argc, argv, false);
}

int cli_clone(int argc, char **argv)
{
  return layer_command("clone", argc, argv, true);
}

int cli_commit(int argc, char **argv)
{
  json_t *res;

  if (argc != 2 || argv[1][0] == '-')
    cli_usage_error("commit takes one overlay NAME");
  res = cli_call(argv[1], "commit", json_pack("{s:s}", "name", argv[1]));
  printf("%s: %lld bytes committed\n", argv[1],
         (long long)json_integer_value(json_object_get(res, "bytes")));
  json_decref(res);
  return 0;
}
