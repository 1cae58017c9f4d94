/* vdbus — vdbusd, the bus daemon: option parsing, start-up, signals,
 * shutdown.  The main thread runs the control loop (control socket, NBD
 * accepts, signals); worker threads run the data path. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "backends/registry.h"
#include "common/error.h"
#include "common/log.h"
#include "daemon/daemon.h"
#include "frontends/frontend.h"
#include "frontends/nbd/nbd-server.h"

#define MAX_LISTEN 16
#define MAX_PLUGIN_DIRS 16

static struct {
  bool foreground;
  const char *pid_file;
  const char *listen[MAX_LISTEN];
  int nlisten;
  bool no_nbd;
  int workers;
  const char *plugin_dirs[MAX_PLUGIN_DIRS]; /* none given: VDB_PLUGIN_DIR */
  int nplugin_dirs;
} opt;

static struct vdb_loop *main_loop;
static struct vdb_watch signal_w;
static int ready_fd = -1; /* write end of the daemonize pipe */
static bool own_socket;    /* we created the control socket */

static void usage(FILE *f)
{
  fprintf(f,
"Usage: vdbusd [OPTION]...\n"
"The vdbus bus daemon: hosts virtual disks, exports them over NBD and\n"
"attaches them as local block devices.\n"
"\n"
"  --state-dir DIR       persisted bus state (default /var/lib/vdbus)\n"
"  --run-dir DIR         control socket vdbus.sock, NBD socket nbd.sock, FUSE\n"
"                        mounts (default /run/vdbus)\n"
"  --nbd-listen ADDR     unix:PATH or tcp:HOST:PORT, repeatable; 'none' turns the\n"
"                        NBD export off (default unix:RUN-DIR/nbd.sock and\n"
"                        tcp:127.0.0.1:10809)\n"
"  --handshake-timeout S drop NBD clients that have not finished the handshake\n"
"                        after S seconds (default 10)\n"
"  --max-connections N   NBD connection limit (default 256)\n"
"  --coalesce-us US      pause US (or US/4) microseconds before waiting again for\n"
"                        an NBD client measured to keep sending meanwhile, so\n"
"                        its requests are taken in fewer wake-ups; 0 = never\n"
"                        (default 40)\n"
"  --poll-us US          poll up to US microseconds for the next request before\n"
"                        sleeping, for an NBD client measured to be served faster\n"
"                        that way (one at low queue depth); 0 = never (default 50)\n"
"  --threads N           data-path worker threads (default: one per CPU)\n"
"  --queues N            ublk queues / kernel NBD connections per device, 1-16\n"
"                        (default: one per CPU, at most 4)\n"
"  --plugin-dir DIR      load the backend plugins (*.so) in DIR, repeatable\n"
"                        (default " VDB_PLUGIN_DIR ", if it exists)\n"
"  -f, --foreground      do not daemonize; log to stderr\n"
"  --pid-file FILE       write the daemon's PID to FILE\n"
"  -D, --debug LIST      debug categories: nbd,io,control,fuse,bus or all\n"
"  -v, --verbose         more messages;  -q, --quiet  errors only\n"
"  -h, --help            this help;  -V, --version  the version\n");
}

static int parse_uint(const char *s, unsigned max, unsigned *out)
{
  char *end;
  unsigned long v;

  errno = 0;
  v = strtoul(s, &end, 10);
  if (errno || end == s || *end || v > max)
    return -EINVAL;
  *out = (unsigned)v;
  return 0;
}

static void die_usage(const char *fmt, const char *arg)
{
  fprintf(stderr, "vdbusd: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\nTry 'vdbusd --help'.\n");
  exit(2);
}

static void set_dir(char *dst, size_t len, const char *src)
{
  if (strlen(src) >= len)
    die_usage("path too long: %s", src);
  snprintf(dst, len, "%s", src);
}

static void parse_args(int argc, char **argv)
{
  enum { O_STATE = 256, O_RUN, O_LISTEN, O_PID, O_HS, O_MAXC, O_THREADS, O_QUEUES, O_PLUGIN_DIR,
         O_COALESCE, O_POLL };
  static const struct option longopts[] = {
    { "state-dir", required_argument, NULL, O_STATE },
    { "run-dir", required_argument, NULL, O_RUN },
    { "nbd-listen", required_argument, NULL, O_LISTEN },
    { "pid-file", required_argument, NULL, O_PID },
    { "handshake-timeout", required_argument, NULL, O_HS },
    { "max-connections", required_argument, NULL, O_MAXC },
    { "threads", required_argument, NULL, O_THREADS },
    { "queues", required_argument, NULL, O_QUEUES },
    { "plugin-dir", required_argument, NULL, O_PLUGIN_DIR },
    { "coalesce-us", required_argument, NULL, O_COALESCE },
    { "poll-us", required_argument, NULL, O_POLL },
    { "foreground", no_argument, NULL, 'f' },
    { "debug", required_argument, NULL, 'D' },
    { "verbose", no_argument, NULL, 'v' },
    { "quiet", no_argument, NULL, 'q' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  unsigned u;
  int c;

  while ((c = getopt_long(argc, argv, "fD:vqhV", longopts, NULL)) != -1) {
    switch (c) {
    case O_STATE: set_dir(vdb_bus_settings.state_dir, sizeof vdb_bus_settings.state_dir, optarg); break;
    case O_RUN: set_dir(vdb_bus_settings.run_dir, sizeof vdb_bus_settings.run_dir, optarg); break;
    case O_LISTEN:
      if (strcmp(optarg, "none") == 0)
        opt.no_nbd = true;
      else if (opt.nlisten == MAX_LISTEN)
        die_usage("too many --nbd-listen (at most 16): %s", optarg);
      else if (strncmp(optarg, "unix:", 5) != 0 && strncmp(optarg, "tcp:", 4) != 0)
        die_usage("--nbd-listen takes unix:PATH, tcp:HOST:PORT or none, not '%s'", optarg);
      else
        opt.listen[opt.nlisten++] = optarg;
      break;
    case O_PID: opt.pid_file = optarg; break;
    case O_HS:
      if (parse_uint(optarg, 86400, &u) < 0 || u == 0)
        die_usage("--handshake-timeout takes seconds from 1 to 86400, not '%s'", optarg);
      vdb_nbd_settings.handshake_timeout_ms = u * 1000;
      break;
    case O_MAXC:
      if (parse_uint(optarg, 1000000, &u) < 0 || u == 0)
        die_usage("--max-connections takes a number from 1 to 1000000, not '%s'", optarg);
      vdb_nbd_settings.max_connections = u;
      break;
    case O_COALESCE:
      if (parse_uint(optarg, 1000, &u) < 0)
        die_usage("--coalesce-us takes microseconds from 0 to 1000, not '%s'", optarg);
      vdb_nbd_settings.coalesce_us = u;
      break;
    case O_POLL:
      if (parse_uint(optarg, 1000, &u) < 0)
        die_usage("--poll-us takes microseconds from 0 to 1000, not '%s'", optarg);
      vdb_nbd_settings.poll_us = u;
      break;
    case O_QUEUES:
      if (parse_uint(optarg, VDB_QUEUES_MAX, &u) < 0 || u == 0)
        die_usage("--queues takes a number from 1 to 16, not '%s'", optarg);
      vdb_bus_settings.queues = u;
      break;
    case O_THREADS:
      if (parse_uint(optarg, 256, &u) < 0 || u == 0)
        die_usage("--threads takes a number from 1 to 256, not '%s'", optarg);
      opt.workers = (int)u;
      break;
    case O_PLUGIN_DIR:
      if (opt.nplugin_dirs == MAX_PLUGIN_DIRS)
        die_usage("too many --plugin-dir (at most 16): %s", optarg);
      opt.plugin_dirs[opt.nplugin_dirs++] = optarg;
      break;
    case 'f': opt.foreground = true; break;
    case 'D':
      if (vdb_debug_parse(optarg, &vdb_debug_mask) < 0)
        die_usage("unknown debug category in '%s' (nbd,io,control,fuse,bus,all)", optarg);
      break;
    case 'v': vdb_log_verbosity = VDB_LOG_DEBUG; break;
    case 'q': vdb_log_verbosity = VDB_LOG_ERR; break;
    case 'h': usage(stdout); exit(0);
    case 'V': printf("vdbusd %s\n", VDB_VERSION); exit(0);
    default: usage(stderr); exit(2);
    }
  }
  if (optind < argc)
    die_usage("unexpected argument '%s'", argv[optind]);
  if (opt.no_nbd && opt.nlisten > 0)
    die_usage("%s", "--nbd-listen none cannot be combined with other listeners");
}

static int make_dir(const char *path, mode_t mode)
{
  char tmp[256];

  snprintf(tmp, sizeof tmp, "%s", path);
  for (char *p = tmp + 1; *p; p++)
    if (*p == '/') {
      *p = '\0';
      mkdir(tmp, 0755);
      *p = '/';
    }
  if (mkdir(tmp, mode) < 0 && errno != EEXIST) {
    fprintf(stderr, "vdbusd: cannot create %s: %s\n", path, strerror(errno));
    return -errno;
  }
  return 0;
}

/* Refuse to start a second daemon on the same run dir. */
static int check_not_running(const char *sock)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  size_t len = strlen(sock);
  int fd, r;

  if (len >= sizeof sa.sun_path) {
    fprintf(stderr, "vdbusd: control socket path too long: %s\n", sock);
    return -ENAMETOOLONG;
  }
  memcpy(sa.sun_path, sock, len + 1);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  close(fd);
  if (r == 0) {
    fprintf(stderr, "vdbusd: another vdbusd is already running on %s\n", sock);
    return -EADDRINUSE;
  }
  return 0;
}

static void signal_cb(struct vdb_watch *w, uint32_t revents)
{
  struct signalfd_siginfo si;

  if (read(w->fd, &si, sizeof si) == sizeof si) {
    vdb_info("signal %d: shutting down", (int)si.ssi_signo);
    vdb_loop_stop(main_loop);
  }
}

static int setup_signals(void)
{
  sigset_t set;

  signal(SIGPIPE, SIG_IGN);
  /* Under a file size limit (ulimit -f) a write past it fails with EFBIG
   * (ENOSPC to the client) rather than killing the daemon. */
  signal(SIGXFSZ, SIG_IGN);
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, NULL); /* before any thread starts */
  signal_w.fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (signal_w.fd < 0)
    return -errno;
  signal_w.events = EPOLLIN;
  signal_w.cb = signal_cb;
  return vdb_loop_watch(main_loop, &signal_w);
}

/* Fork; the parent waits until the child says it is ready (exit 0) or
 * fails (exit 1). */
static void daemonize(void)
{
  int p[2];
  pid_t pid;
  char c;

  if (pipe2(p, O_CLOEXEC) < 0 || (pid = fork()) < 0) {
    perror("vdbusd: fork");
    exit(1);
  }
  if (pid > 0) {
    close(p[1]);
    exit(read(p[0], &c, 1) == 1 && c == 'R' ? 0 : 1);
  }
  close(p[0]);
  ready_fd = p[1];
  setsid();
  vdb_log_use_syslog("vdbusd");
}

static void notify_ready(void)
{
  int fd = open("/dev/null", O_RDWR);

  if (ready_fd < 0)
    return;
  if (fd >= 0) {
    dup2(fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    close(fd);
  }
  if (write(ready_fd, "R", 1) != 1)
    vdb_warn("cannot tell the parent that we are ready");
  close(ready_fd);
  ready_fd = -1;
}

static int write_pid_file(void)
{
  FILE *f;

  if (!opt.pid_file)
    return 0;
  f = fopen(opt.pid_file, "w");
  if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) {
    vdb_err("cannot write pid file %s: %m", opt.pid_file);
    return -errno;
  }
  return 0;
}

static int start_nbd(void)
{
  char def_unix[300];

  if (opt.no_nbd)
    return 0;
  if (opt.nlisten == 0) {
    snprintf(def_unix, sizeof def_unix, "unix:%s/nbd.sock", vdb_bus_settings.run_dir);
    opt.listen[opt.nlisten++] = def_unix;
    opt.listen[opt.nlisten++] = "tcp:127.0.0.1:10809";
  }
  for (int i = 0; i < opt.nlisten; i++) {
    int r = vdb_nbd_listen(main_loop, opt.listen[i]);
    if (r < 0) {
      vdb_err("NBD listener %s: %s", opt.listen[i], vdb_get_error());
      return r;
    }
  }
  if (opt.nlisten > 0 && opt.listen[0] == def_unix)
    opt.listen[0] = NULL; /* def_unix goes out of scope */
  return 0;
}

/* Load the plugins of each --plugin-dir (an error if one cannot be read),
 * or of the default directory (nothing if it does not exist). */
static int load_plugins(void)
{
  static const char *const def[] = { VDB_PLUGIN_DIR };
  const char *const *dirs = opt.nplugin_dirs ? opt.plugin_dirs : def;
  int n = opt.nplugin_dirs ? opt.nplugin_dirs : 1, r;

  for (int i = 0; i < n; i++)
    if ((r = vdb_backend_plugins_load(dirs[i], opt.nplugin_dirs > 0)) < 0) {
      vdb_err("%s", vdb_get_error());
      return r;
    }
  return 0;
}

static void on_bus_change(void) { vdb_state_save(); }

static int start(void)
{
  char sock[300];
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  int r;

  snprintf(sock, sizeof sock, "%s/vdbus.sock", vdb_bus_settings.run_dir);
  if (make_dir(vdb_bus_settings.run_dir, 0755) < 0 || make_dir(vdb_bus_settings.state_dir, 0700) < 0)
    return -1;
  if ((r = check_not_running(sock)) < 0)
    exit(1);
  if ((r = load_plugins()) < 0)
    return r;
  if (!opt.foreground)
    daemonize();
  if ((r = vdb_loop_create(&main_loop)) < 0 || (r = setup_signals()) < 0)
    return r;
  vdb_frontends_cleanup_stale(vdb_bus_settings.run_dir);
  r = vdb_workers_start(opt.workers ? opt.workers : (int)(ncpu > 0 ? ncpu : 1));
  if (r < 0) {
    vdb_err("cannot start worker threads: %s", strerror(-r));
    return r;
  }
  if ((r = start_nbd()) < 0)
    return r;
  if ((r = vdb_state_load()) < 0) {
    vdb_err("%s", vdb_get_error());
    return r;
  }
  vdb_frontends_cleanup_unclaimed();
  vdb_bus_on_change = on_bus_change;
  vdb_state_save();
  if ((r = vdb_control_listen(main_loop, sock)) < 0) {
    vdb_err("%s", vdb_get_error());
    return r;
  }
  own_socket = true;
  if ((r = write_pid_file()) < 0)
    return r;
  vdb_info("vdbusd %s ready: control socket %s", VDB_VERSION, sock);
  notify_ready();
  return 0;
}

static void stop(void)
{
  char sock[300];

  snprintf(sock, sizeof sock, "%s/vdbus.sock", vdb_bus_settings.run_dir);
  vdb_control_close();
  if (own_socket)
    unlink(sock);
  vdb_nbd_stop_listening();
  vdb_nbd_shutdown(30000);
  vdb_bus_on_change = NULL;   /* keep bus.json as it is: disks come back */
  vdb_bus_unplug_all();
  vdb_backend_plugins_unload();
  vdb_workers_stop();
  if (opt.pid_file)
    unlink(opt.pid_file);
}

int main(int argc, char **argv)
{
  int r;

  parse_args(argc, argv);
  if (start() < 0) {
    if (ready_fd < 0 && !vdb_get_error()[0])
      fprintf(stderr, "vdbusd: start-up failed\n");
    stop();
    return 1;
  }
  r = vdb_loop_run(main_loop);
  if (r < 0)
    vdb_err("main loop: %s", strerror(-r));
  stop();
  vdb_info("vdbusd stopped");
  return r < 0 ? 1 : 0;
}
