/* sluice-launch: what the command executor starts a job's program through.
 *
 *   sluice-launch PARENT_PID [-c CPU_S] [-m BYTES] [-n FILES] [-p PROCS] -- PROGRAM ARGS...
 *
 * It sets the job's limits (setrlimit: CPU seconds, address space, open files, processes),
 * asks the kernel to SIGKILL it when the executor dies (PR_SET_PDEATHSIG: a job never
 * outlives an executor that was killed, so its rerun after the lease never overlaps it),
 * then execs the program: the program runs as this process, in its process group.
 * It exits with 127 and a line on stderr when any of that fails.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

static int fail(const char *what) {
    fprintf(stderr, "sluice-launch: %s: %s\n", what, strerror(errno));
    return 127;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: sluice-launch PARENT_PID [-c CPU_S] [-m BYTES] [-n FILES] [-p PROCS] -- PROGRAM ARGS...\n");
        return 127;
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return fail("PR_SET_PDEATHSIG");
    /* The executor may have died before the line above: then nothing would kill us. */
    if ((long)getppid() != strtol(argv[1], NULL, 10)) return 127;
    int i = 2;
    for (; i + 1 < argc && strcmp(argv[i], "--") != 0; i += 2) {
        char *end = NULL;
        errno = 0;
        unsigned long long value = strtoull(argv[i + 1], &end, 10);
        if (errno != 0 || end == argv[i + 1] || *end != '\0') {
            errno = EINVAL;
            return fail(argv[i]);
        }
        int resource;
        struct rlimit limit = {(rlim_t)value, (rlim_t)value};
        if (strcmp(argv[i], "-c") == 0) {
            resource = RLIMIT_CPU;
            limit.rlim_max = (rlim_t)value + 1; /* SIGXCPU at the limit, SIGKILL a second on */
        } else if (strcmp(argv[i], "-m") == 0) {
            resource = RLIMIT_AS;
        } else if (strcmp(argv[i], "-n") == 0) {
            resource = RLIMIT_NOFILE;
        } else if (strcmp(argv[i], "-p") == 0) {
            resource = RLIMIT_NPROC;
        } else {
            errno = EINVAL;
            return fail(argv[i]);
        }
        struct rlimit current;
        if (getrlimit(resource, &current) == 0 && current.rlim_max != RLIM_INFINITY) {
            /* Lowering is always allowed; raising past the hard limit is not. */
            if (limit.rlim_max > current.rlim_max) limit.rlim_max = current.rlim_max;
            if (limit.rlim_cur > limit.rlim_max) limit.rlim_cur = limit.rlim_max;
        }
        if (setrlimit(resource, &limit) != 0) return fail(argv[i]);
    }
    if (i + 1 >= argc || strcmp(argv[i], "--") != 0) {
        errno = EINVAL;
        return fail("no program after --");
    }
    execv(argv[i + 1], argv + i + 1);
    return fail(argv[i + 1]);
}
