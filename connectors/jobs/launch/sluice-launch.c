/* sluice-launch: the command executor's spawn server.
 *
 *   sluice-launch --serve SOCKET_FD PARENT_PID
 *
 * A job worker starts one for each queue of the command executor and talks to it over a
 * SOCK_SEQPACKET socket (SOCKET_FD): the worker never forks itself, and a job's program
 * is one fork of this small process and one exec.
 *
 * Requests (native byte order; struct request, then NUL-terminated strings):
 *   SPAWN  tag, limits, uid/gid, the job's directory, argv, env; the job's stdin, stdout
 *          and stderr come with it (SCM_RIGHTS). The child gets a process group of its
 *          own, creates its directory and works in it, gets its limits (setrlimit: CPU
 *          seconds, address space, open files, processes) and its user, asks the kernel
 *          to SIGKILL it when this server dies, and execs the program. Any of that
 *          failing: a line on the job's stderr and exit status 127.
 *   SIGNAL tag, signal: to the job's whole process group, while its leader is not reaped
 *          (a signal never reaches a group whose id was reused).
 * Replies (struct reply): STARTED tag, pid (or the fork's errno); EXITED tag, wait
 * status, and whether the job's directory was left (not empty: the worker removes it).
 * When a job's program exits, whatever of its group still runs is SIGKILLed before the
 * program is reaped. The server dies with the worker (PR_SET_PDEATHSIG), and its jobs
 * with it: a job never outlives a killed worker, so its rerun after the lease never
 * overlaps it. When the worker closes the socket, the jobs left are killed and reaped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

enum { SPAWN = 1, SIGNAL = 2 };
enum { STARTED = 1, EXITED = 2 };
enum { MAX_REQUEST = 256 * 1024, MAX_STRINGS = 4096 };

struct __attribute__((packed)) request {
    uint32_t kind;
    uint32_t nargs;
    uint32_t nenv;
    int32_t sig;
    uint64_t tag;
    int64_t limits[4]; /* CPU seconds, address space bytes, open files, processes; <0: none */
    int32_t uid;       /* <0: the server's own */
    int32_t gid;
};

struct __attribute__((packed)) reply {
    uint64_t tag;
    int32_t kind;
    int32_t pid;
    int32_t status;
    int32_t error;
};

struct child {
    uint64_t tag;
    pid_t pid;
    char *dir;
    struct child *next;
};

static struct child *children;
static int sock = -1;
static sigset_t old_mask;
static pid_t self;

static void answer(uint64_t tag, int kind, pid_t pid, int status, int error) {
    struct reply r = {tag, kind, pid, status, error};
    while (send(sock, &r, sizeof r, MSG_NOSIGNAL) < 0 && errno == EINTR) {
        /* Any other failure: the worker is gone, and this server ends with it. */
    }
}

static _Noreturn void fail(const char *what) {
    dprintf(2, "sluice-launch: %s: %s\n", what, strerror(errno));
    _exit(127);
}

static void limit(int resource, int64_t value, int cpu) {
    if (value < 0) return;
    struct rlimit want = {(rlim_t)value, (rlim_t)value + (cpu ? 1 : 0)}; /* SIGXCPU, then SIGKILL */
    struct rlimit current;
    if (getrlimit(resource, &current) == 0 && current.rlim_max != RLIM_INFINITY) {
        /* Lowering is always allowed; raising past the hard limit is not. */
        if (want.rlim_max > current.rlim_max) want.rlim_max = current.rlim_max;
        if (want.rlim_cur > want.rlim_max) want.rlim_cur = want.rlim_max;
    }
    if (setrlimit(resource, &want) != 0) fail("setrlimit");
}

static _Noreturn void run(const struct request *req, int fds[3], char *dir, char **argv,
                          char **env) {
    sigprocmask(SIG_SETMASK, &old_mask, NULL);
    setpgid(0, 0);
    for (int i = 0; i < 3; i++) {
        if (dup2(fds[i], i) < 0) _exit(127); /* the received fds are close-on-exec */
    }
    if (mkdir(dir, 0700) != 0) fail("mkdir");
    if (req->uid >= 0 && chown(dir, (uid_t)req->uid, (gid_t)req->gid) != 0) fail("chown");
    if (chdir(dir) != 0) fail("chdir");
    limit(RLIMIT_CPU, req->limits[0], 1);
    limit(RLIMIT_AS, req->limits[1], 0);
    limit(RLIMIT_NOFILE, req->limits[2], 0);
    limit(RLIMIT_NPROC, req->limits[3], 0);
    if (req->gid >= 0) {
        if (setgroups(0, NULL) != 0) fail("setgroups");
        if (setgid((gid_t)req->gid) != 0) fail("setgid");
    }
    if (req->uid >= 0 && setuid((uid_t)req->uid) != 0) fail("setuid");
    /* After the user changed (a change of user clears it). */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) fail("PR_SET_PDEATHSIG");
    if (getppid() != self) _exit(127); /* the server died before the line above */
    execve(argv[0], argv, env);
    fail(argv[0]);
}

/* The request's strings, NUL-terminated one after another, as `count` pointers. */
static int strings(char **at, char *end, char **out, uint32_t count) {
    for (uint32_t i = 0; i < count; i++) {
        char *nul = memchr(*at, '\0', (size_t)(end - *at));
        if (nul == NULL) return -1;
        out[i] = *at;
        *at = nul + 1;
    }
    out[count] = NULL;
    return 0;
}

static void spawn(struct request *req, char *body, char *end, int fds[3]) {
    static char *argv[MAX_STRINGS + 1], *env[MAX_STRINGS + 1];
    char *dir[2];
    if (req->nargs < 1 || req->nargs > MAX_STRINGS || req->nenv > MAX_STRINGS ||
        strings(&body, end, dir, 1) || strings(&body, end, argv, req->nargs) ||
        strings(&body, end, env, req->nenv)) {
        answer(req->tag, STARTED, 0, 0, EINVAL);
        return;
    }
    struct child *c = malloc(sizeof *c);
    char *kept = strdup(dir[0]);
    if (c == NULL || kept == NULL) {
        free(c);
        free(kept);
        answer(req->tag, STARTED, 0, 0, ENOMEM);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) run(req, fds, dir[0], argv, env);
    if (pid < 0) {
        int error = errno;
        free(c);
        free(kept);
        answer(req->tag, STARTED, 0, 0, error);
        return;
    }
    setpgid(pid, pid); /* as the child does: a signal right after this finds the group */
    *c = (struct child){req->tag, pid, kept, children};
    children = c;
    answer(req->tag, STARTED, pid, 0, 0);
}

static void signal_job(uint64_t tag, int sig) {
    for (struct child *c = children; c != NULL; c = c->next) {
        if (c->tag == tag) {
            /* Its leader may have left the group: then the leader alone. */
            if (killpg(c->pid, sig) != 0) kill(c->pid, sig);
            return;
        }
    }
}

/* Every exited job: the rest of its group killed, reaped, its directory removed if empty. */
static void reap(int block) {
    for (;;) {
        siginfo_t info;
        memset(&info, 0, sizeof info);
        int flags = WEXITED | WNOWAIT | (block ? 0 : WNOHANG);
        if (waitid(P_ALL, 0, &info, flags) != 0) {
            if (errno == EINTR) continue;
            return; /* ECHILD: none left */
        }
        if (info.si_pid == 0) return;
        pid_t pid = info.si_pid;
        killpg(pid, SIGKILL);
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        for (struct child **at = &children; *at != NULL; at = &(*at)->next) {
            struct child *c = *at;
            if (c->pid != pid) continue;
            int left = rmdir(c->dir) != 0 && errno != ENOENT;
            *at = c->next;
            answer(c->tag, EXITED, pid, status, left);
            free(c->dir);
            free(c);
            break;
        }
        if (block && children == NULL) return;
    }
}

int main(int argc, char **argv) {
    if (argc != 4 || strcmp(argv[1], "--serve") != 0) {
        fprintf(stderr, "usage: sluice-launch --serve SOCKET_FD PARENT_PID\n");
        return 127;
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return 127;
    /* The worker may have died before the line above: then nothing would kill us. */
    if ((long)getppid() != strtol(argv[3], NULL, 10)) return 127;
    self = getpid();
    sock = atoi(argv[2]);
    if (fcntl(sock, F_SETFD, FD_CLOEXEC) != 0) return 127;
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &chld, &old_mask) != 0) return 127;
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) return 127;
    static char buffer[MAX_REQUEST];
    for (;;) {
        struct pollfd polled[2] = {{sock, POLLIN, 0}, {sfd, POLLIN, 0}};
        if (poll(polled, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (polled[1].revents) {
            struct signalfd_siginfo drained[16];
            while (read(sfd, drained, sizeof drained) > 0) {
            }
            reap(0);
        }
        if (!polled[0].revents) continue;
        union {
            char space[CMSG_SPACE(3 * sizeof(int))];
            struct cmsghdr align;
        } control;
        struct iovec iov = {buffer, sizeof buffer};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break; /* the worker closed the socket, or died */
        int fds[3] = {-1, -1, -1};
        int nfds = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                nfds = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                if (nfds > 3) nfds = 3;
                memcpy(fds, CMSG_DATA(cm), (size_t)nfds * sizeof(int));
            }
        }
        struct request req;
        if ((size_t)n >= sizeof req && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            memcpy(&req, buffer, sizeof req);
            if (req.kind == SPAWN && nfds == 3) {
                spawn(&req, buffer + sizeof req, buffer + n, fds);
            } else if (req.kind == SIGNAL) {
                signal_job(req.tag, req.sig);
            } else if (req.kind == SPAWN) {
                answer(req.tag, STARTED, 0, 0, EINVAL);
            }
        }
        for (int i = 0; i < nfds; i++) close(fds[i]);
    }
    /* The worker is done: the jobs left go, with their groups. */
    for (struct child *c = children; c != NULL; c = c->next) killpg(c->pid, SIGKILL);
    if (children != NULL) reap(1);
    return 0;
}
