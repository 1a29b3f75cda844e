// SIGBUS plumbing for the in-thread resolvers (FEATURE_SIGBUS): install a handler
// once, and pass a signal that is not ours on. Both are async-signal-safe.
#ifndef C_USERFAULTFD_SIGNAL_H
#define C_USERFAULTFD_SIGNAL_H

#ifdef __linux__

#include <signal.h>
#include <string.h>

/// Installs `handler` for SIGBUS (SA_SIGINFO | SA_RESTART) the first time a caller
/// flips `*installed` from 0 to 1; the action it replaces is kept in `*previous`.
static inline void cuffd_sigbus_install_once(int *installed, void (*handler)(int, siginfo_t *, void *),
                                             struct sigaction *previous) {
    if (__atomic_load_n(installed, __ATOMIC_ACQUIRE)) return;
    int expected = 0;
    if (!__atomic_compare_exchange_n(installed, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = handler;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, previous);
}

/// Passes a SIGBUS that is not ours on: to the `previous` handler, or to the default
/// action (the faulting instruction runs again and the signal kills the process).
static inline void cuffd_sigbus_chain(const struct sigaction *previous, int sig, siginfo_t *info, void *context) {
    if (previous->sa_flags & SA_SIGINFO) {
        if (previous->sa_sigaction) {
            previous->sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN) {
        previous->sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &dfl, NULL);
}

#endif // __linux__
#endif // C_USERFAULTFD_SIGNAL_H
