/* vdbus — the command-line tool: plug virtual disks into vdbusd and out. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

static void usage(FILE *f)
{
  fprintf(f,
"Usage: vdbus [--socket PATH] COMMAND [ARGS]\n"
"Plug virtual disks into the vdbus bus daemon (vdbusd) and out.\n"
"\n"
"Commands:\n"
"  plug ram --size SIZE [OPTIONS]          a sparse RAM disk (volatile)\n"
"  plug file PATH [--size SIZE] [--create] [OPTIONS]\n"
"                                          a file or block device\n"
"  plug nbd URI [--connections N] [--timeout S]\n"
"                                          a remote NBD server (nbd://HOST[:PORT]/EXPORT,\n"
"                                          nbd+unix:///EXPORT?socket=PATH, nbds://...)\n"
"  plug error --size SIZE [--error-rate R] [--error-ops LIST] [--error-errno E]\n"
"  plug delay --size SIZE [--delay-read MS] [--delay-write MS] [--delay-other MS]\n"
"  plug trace --size SIZE --trace-file PATH\n"
"                                          test disks: faults, delays, call traces\n"
"  plug cow --base NAME [--store ram|file:PATH] [--chunk-size SIZE] [OPTIONS]\n"
"                                          a copy-on-write overlay over a plugged\n"
"                                          disk (which turns read-only meanwhile)\n"
"  plug rbd [rbd:]POOL/IMAGE[@SNAP] [--create --size SIZE] [--snap SNAP]\n"
"           [--conf FILE] [--id CLIENT] [--keyring FILE] [--timeout SECS]\n"
"                                          a Ceph RBD image (snapshots: RBD snaps)\n"
"  plug BACKEND [ARG] [OPTIONS]            a backend from a plugin: ARG sets its\n"
"                                          positional parameter (see 'vdbus help\n"
"                                          backend BACKEND')\n"
"  snapshot NAME [--as SNAP] [--store ram|file:PATH] [--attach MODE] [--no-export]\n"
"                                          a read-only point-in-time copy of NAME,\n"
"                                          taken without copying; NAME carries on\n"
"  clone SNAP [--as NAME] [--store ram|file:PATH] [--readonly] [--attach MODE]\n"
"                                          a writable disk starting from SNAP\n"
"  commit NAME                             write an overlay's changes into its base\n"
"  unplug NAME [--force] | unplug --all [--force]\n""  unplug SNAP --merge                     drop a snapshot that one overlay (the\n"
"                                          disk it was taken of, or a clone) layers\n"
"                                          over: its changes go into the snapshot's\n"
"                                          storage, which that disk then uses\n"
"  list [--json]                           plugged disks\n"
"  info NAME [--json]                      settings and I/O counters of a disk\n"
"  backends [--json]                       the backends this daemon has (built-in\n"
"                                          and from plugins, with their paths)\n"
"  help backend NAME                       a backend's parameters\n"
"  version                                 client and daemon versions\n"
"\n"
"Plug options:\n"
"  --name NAME           disk name (default vd0, vd1, ...)\n"
"  --readonly            read-only disk\n"
"  --block-size 512|4096 logical block size of the attached device (default 512)\n"
"  --attach auto|ublk|nbd-kernel|loop|none\n"
"                        local block device: /dev/ublkbN, /dev/nbdN (kernel NBD\n"
"                        client), /dev/loopN (loop over FUSE) or none (default\n"
"                        auto: the first of ublk, nbd-kernel, loop that works here)\n"
"  --no-export           do not export the disk over NBD\n"
"  --param KEY=VALUE     any backend parameter (see 'vdbus help backend NAME')\n"
"\n"
"Sizes take K, M, G, T suffixes (powers of 1024) or plain bytes.\n"
"The daemon's socket is --socket PATH, else $VDBUS_SOCKET, else\n"
"/run/vdbus/vdbus.sock.\n");
}

static int cli_version(int argc, char **argv)
{
  json_t *res;

  printf("vdbus %s\n", VDB_VERSION);
  res = cli_call("version", "hello", NULL);
  printf("vdbusd %s (control protocol %d)\n",
         json_string_value(json_object_get(res, "version")),
         (int)json_integer_value(json_object_get(res, "protocol")));
  json_decref(res);
  return 0;
}

static int cli_help(int argc, char **argv)
{
  static json_t *res; /* static: still reachable when cli_die() exits */
  json_t *b;
  size_t i;

  if (argc == 1) {
    usage(stdout);
    return 0;
  }
  if (argc != 3 || strcmp(argv[1], "backend") != 0)
    cli_usage_error("help takes no arguments or 'backend NAME'");
  res = cli_call("help", "backends", NULL);
  json_array_foreach(res, i, b)
    if (strcmp(json_string_value(json_object_get(b, "name")), argv[2]) == 0) {
      const char *origin = json_string_value(json_object_get(b, "origin"));
      const char *pos = json_string_value(json_object_get(b, "positional"));
      printf("%s: %s\n", argv[2], json_string_value(json_object_get(b, "summary")));
      if (origin && strcmp(origin, "built-in") != 0)
        printf("Plugin: %s\n", origin);
      printf("\nParameters:\n%s", json_string_value(json_object_get(b, "usage")));
      if (pos)
        printf("\n'vdbus plug %s ARG' sets %s=ARG.\n", argv[2], pos);
      json_decref(res);
      return 0;
    }
  cli_die("help", "no backend named '%s' (see 'vdbus backends')", argv[2]);
}

static const struct {
  const char *name;
  int (*fn)(int argc, char **argv);
} commands[] = {
  { "plug", cli_plug }, { "unplug", cli_unplug }, { "list", cli_list },
  { "info", cli_info }, { "backends", cli_backends }, { "help", cli_help },
  { "version", cli_version }, { "snapshot", cli_snapshot }, { "clone", cli_clone },
  { "commit", cli_commit },
};

int main(int argc, char **argv)
{
  int i = 1;

  cli_socket = getenv("VDBUS_SOCKET");
  if (!cli_socket || !*cli_socket)
    cli_socket = "/run/vdbus/vdbus.sock";
  while (i < argc && argv[i][0] == '-') {
    if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc) {
      cli_socket = argv[i + 1];
      i += 2;
    } else if (strncmp(argv[i], "--socket=", 9) == 0) {
      cli_socket = argv[i++] + 9;
    } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
      usage(stdout);
      return 0;
    } else if (strcmp(argv[i], "-V") == 0 || strcmp(argv[i], "--version") == 0) {
      printf("vdbus %s\n", VDB_VERSION);
      return 0;
    } else {
      cli_usage_error("unknown option '%s'", argv[i]);
    }
  }
  if (i == argc)
    cli_usage_error("no command given");
  for (size_t c = 0; c < sizeof commands / sizeof commands[0]; c++)
    if (strcmp(argv[i], commands[c].name) == 0)
      return commands[c].fn(argc - i, argv + i);
  cli_usage_error("unknown command '%s'", argv[i]);
}
