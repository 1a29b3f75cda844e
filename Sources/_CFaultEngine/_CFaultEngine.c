#include "_CFaultEngine.h"

#ifdef __linux__
#include <pthread.h>
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>
#include <sys/mman.h>

void *cfe_mremap_fixed(void *old_address, size_t size, void *new_address) {
    return mremap(old_address, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, new_address);
}

int cfe_pipe_nonblocking(int fds[2]) {
    return pipe2(fds, O_CLOEXEC | O_NONBLOCK);
}

int cfe_pin_current_thread(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

#endif
