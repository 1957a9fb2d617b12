"""The seccomp filter every job runs under: the OCI `linux.seccomp` object that runc compiles
(with libseccomp) and loads just before it starts the job's init.

Why: a job's processes are root in the host's own user namespace, kept in check only by
namespaces and a short capability list. Without a filter the whole kernel is theirs to call:
`unshare -U` hands a job every capability again inside a user namespace of its own (where it
can mount file systems and reach code that is otherwise root-only), and the kernel keyrings are
not namespaced at all, so `add_key(..., @u)` writes into the host root's keyring. The profile
has the effect of Docker's and runc's default profile for a container without CAP_SYS_ADMIN.

How: everything is allowed except the calls in `DENIED`, which fail with EPERM, and three
decided by their arguments: `clone` is refused with any namespace flag, `personality` with a
flag that changes how memory is laid out (ASLR off, readable implies executable, ...), and
`clone3` fails with ENOSYS, not EPERM, so that glibc falls back to `clone`, whose flags the
filter can see (clone3 passes them in memory, out of seccomp's reach).

Why a deny-list, not Docker's allow-list: with runc 1.1 and libseccomp 2.5, an allow-list of
the ~390 calls programs use made every `runc run` 15-20 ms slower (most of it libseccomp
generating the BPF program), a fifth of a job start; this list costs 3-4 ms, within the 10%
the issue allows. The price is that a call a future kernel adds is allowed until it is named.
`ALLOWED` records what was reviewed and let through, and tests/runtime/test_seccomp.py fails as
soon as the host's libseccomp knows a call that is in neither list, so that a new call is
decided on, not let through unseen.

runc skips names its libseccomp does not know (a newer call such as `open_tree_attr` is listed
for when it does) and applies names of another architecture (the i386 `clock_settime64`, arm's
`pciconfig_read`) only where they exist, so one list fits every host.

A job may run without the filter only by asking with `config.seccomp: "unconfined"`, and only in
the system partition (checked in `flynn_host.types`).
"""

from __future__ import annotations

import errno
import platform
from typing import Any

DEFAULT = "default"
UNCONFINED = "unconfined"
PROFILES = (DEFAULT, UNCONFINED)

# clone(2) flags that make a namespace: CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS,
# CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET (0x7E020000 together). CLONE_NEWTIME
# (0x80) is part of the exit signal for clone; only clone3 and unshare take it, both refused.
CLONE_NAMESPACE_FLAGS = (
    0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
)  # fmt: skip

# personality(2) flags refused: every flag above UNAME26, of which the kernel acts on
# ADDR_NO_RANDOMIZE (0x40000), MMAP_PAGE_ZERO, ADDR_COMPAT_LAYOUT, READ_IMPLIES_EXEC,
# ADDR_LIMIT_32BIT and ADDR_LIMIT_3GB. Still allowed: PER_LINUX, PER_LINUX32 (`linux32`: a
# 32-bit `uname -m`), UNAME26, and 0xffffffff, which only asks for the current value. (Other
# execution domains than Linux were removed from the kernel in 4.1: setting one does nothing.)
PERSONALITY_FLAGS = 0x0FFC0000

# Refused with EPERM, by reason.
DENIED: dict[str, tuple[str, ...]] = {
    # not namespaced: a job would read and write the keyrings of the host's root user
    "kernel keyrings": ("add_key", "keyctl", "request_key"),
    # a mount, even in the job's own namespace, reaches file system code written for root;
    # the job's mounts are made by the host
    "mounts": (
        "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
        "move_mount", "open_tree", "open_tree_attr", "mount_setattr",
    ),
    # a new user namespace gives every capability back inside it (clone with namespace flags
    # and clone3 are refused below); the host makes the job's namespaces and sets its hostname
    "namespaces": ("unshare", "setns", "sethostname", "setdomainname"),
    # loading or replacing kernel code
    "kernel code": (
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "create_module", "query_module", "get_kernel_syms", "bpf", "uselib",
    ),
    # reading or changing other processes, and kernel profiling
    "tracing": (
        "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
        "process_madvise", "perf_event_open", "lookup_dcookie",
    ),
    # the host's clock. adjtimex stays allowed: without CAP_SYS_TIME it can only read the
    # clock's state (glibc's ntp_gettime uses it), as in Docker's profile
    "clock": (
        "settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime",
        "clock_adjtime64",
    ),
    # the machine itself
    "host administration": (
        "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "vhangup",
        "nfsservctl", "iopl", "ioperm", "pciconfig_iobase", "pciconfig_read",
        "pciconfig_write", "vm86", "vm86old",
    ),
    # what the kernel says about itself: its log, and old sysctl and file system interfaces
    "kernel information": ("syslog", "_sysctl", "sysfs", "ustat"),
    # file handles open files by inode, past the job's mount namespace and root (the
    # "shocker" escape); fanotify reports them
    "file handles": ("name_to_handle_at", "open_by_handle_at", "fanotify_init"),
    # NUMA placement is the host's to decide, across jobs (CAP_SYS_NICE in Docker's profile)
    "memory placement": (
        "mbind", "set_mempolicy", "get_mempolicy", "set_mempolicy_home_node", "move_pages",
        "migrate_pages",
    ),
    # kernel interfaces behind many privilege escalations, which ordinary programs do without
    # (libuv and others fall back when io_uring is refused)
    "exploit surface": ("userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register"),
}  # fmt: skip

# Decided by their arguments or errno (see `default_profile`).
CONDITIONAL = ("clone", "clone3", "personality")

# Reviewed and allowed: every other system call of Linux (up to 6.17) on x86_64, i386, x32,
# aarch64 and arm, the never-implemented ones (afs_syscall, tuxcall, ...) included, which the
# kernel answers with ENOSYS. Not part of the profile (what is not denied is allowed); the tests
# check that DENIED, CONDITIONAL and ALLOWED together name every call libseccomp knows.
_ALLOWED_NAMES = """
_llseek _newselect accept accept4 access adjtimex afs_syscall alarm arch_prctl arm_fadvise64_64
arm_sync_file_range bdflush bind break breakpoint brk cacheflush cachestat capget capset chdir
chmod chown chown32 chroot clock_getres clock_getres_time64 clock_gettime clock_gettime64
clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2
dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64
fadvise64_64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat
fcntl fcntl64 fdatasync fgetxattr file_getattr file_setattr flistxattr flock fork fremovexattr
fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftime ftruncate ftruncate64 futex
futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat get_robust_list
get_thread_area get_tls getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32
getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getpmsg
getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit getrusage
getsid getsockname getsockopt gettid gettimeofday getuid getuid32 getxattr getxattrat gtty idle
inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel io_destroy io_getevents
io_pgetevents io_pgetevents_time64 io_setup io_submit ioctl ioprio_get ioprio_set ipc kill
landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link
linkat listen listmount listxattr listxattrat llistxattr lock lremovexattr lseek lsetxattr
lsm_get_self_attr lsm_list_modules lsm_set_self_attr lstat lstat64 madvise map_shadow_stack
membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall
mmap mmap2 modify_ldt mprotect mpx mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal msgctl msgget
msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat nice oldfstat oldlstat
oldolduname oldstat olduname open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2
pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2
prlimit64 process_mrelease prof profil pselect6 pselect6_time64 putpmsg pwrite64 pwritev
pwritev2 read readahead readdir readlink readlinkat readv recv recvfrom recvmmsg
recvmmsg_time64 recvmsg remap_file_pages removexattr removexattrat rename renameat renameat2
restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo
sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr sched_getparam
sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp security select semctl
semget semop semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto
set_robust_list set_thread_area set_tid_address set_tls setfsgid setfsgid32 setfsuid setfsuid32
setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority setregid setregid32
setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit setsid setsockopt
setuid setuid32 setxattr setxattrat sgetmask shmat shmctl shmdt shmget shutdown sigaction
sigaltstack signal signalfd signalfd4 sigpending sigprocmask sigreturn sigsuspend socket
socketcall socketpair splice ssetmask stat stat64 statfs statfs64 statmount statx stty symlink
symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete
timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create
timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate
truncate64 tuxcall ugetrlimit ulimit umask uname unlink unlinkat uretprobe usr26 usr32 utime
utimensat utimensat_time64 utimes vfork vmsplice vserver wait4 waitid waitpid write writev
"""
ALLOWED = frozenset(_ALLOWED_NAMES.split())

# The architectures a filter covers, by the host's machine: a 64-bit host also runs 32-bit
# programs, whose calls have numbers of their own, and libseccomp kills a process calling
# through an architecture the filter does not name. x32 is named even where the kernel lacks it.
ARCHITECTURES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


def _refuse(names: list[str], ret: int = errno.EPERM, **cond: int) -> dict[str, Any]:
    """A rule refusing `names` with `ret`; with `mask` and `value`: only when
    (argument 0 & mask) == value."""
    rule: dict[str, Any] = {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": ret}
    if cond:
        rule["args"] = [{"index": 0, "value": cond["mask"], "valueTwo": cond["value"],
                         "op": "SCMP_CMP_MASKED_EQ"}]  # fmt: skip
    return rule


def personality_rules() -> list[dict[str, Any]]:
    """Refuse personality(v) when v sets a flag in PERSONALITY_FLAGS, unless v is the query.

    runc gives each comparison on an argument a rule of its own (a call is refused when any
    matches), so "a flag set and v != 0xffffffff" is spelt with single-bit tests around one
    pivot flag p: (a flag other than p set, p clear) or (p set, any one other bit clear).
    Neither matches the query, which has every bit set, and every refused value matches one."""
    bits = [1 << i for i in range(32)]
    flags = [b for b in bits if b & PERSONALITY_FLAGS]
    pivot = flags[0]
    rules = [_refuse(["personality"], mask=f | pivot, value=f) for f in flags[1:]]
    rules += [_refuse(["personality"], mask=pivot | b, value=pivot) for b in bits if b != pivot]
    return rules


def default_profile(machine: str | None = None) -> dict[str, Any]:
    """The OCI `linux.seccomp` object of the default profile, for this host's architecture
    (or `machine`, as `platform.machine()` names it)."""
    # any other machine gets its native architecture only (clone's flags are argument 0
    # everywhere but on s390, which flynn-host does not run on)
    archs = ARCHITECTURES.get(machine or platform.machine(), [])
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": archs,
        "syscalls": [
            _refuse(sorted(denied_names())),
            *(_refuse(["clone"], mask=f, value=f) for f in CLONE_NAMESPACE_FLAGS),
            _refuse(["clone3"], errno.ENOSYS),
            *personality_rules(),
        ],
    }


def denied_names() -> set[str]:
    return {name for names in DENIED.values() for name in names}
