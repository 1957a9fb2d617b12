"""The default seccomp profile (`flynn_host.runtime.seccomp`): what the spec says, what a real job
under runc can and cannot call, how a system job opts out, and that ordinary programs still
work.

Three kinds of check, each of which fails without the filter: a probe that makes every denied
call from inside a `components` job (Python's ctypes) and reports its errno, run once confined
and once unconfined, where the same calls get through (add_key lands in the host root's keyring
and is removed again here); the filter runc actually loaded, read back from a job's init with
PTRACE_SECCOMP_GET_FILTER and run for every call on x86_64, i386 and x32, which covers the
32-bit ABIs a 64-bit probe cannot reach and calls that a missing capability would refuse anyway;
and the issue's reproductions in busybox.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import platform
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from flynn_host.client import HostAPIError
from flynn_host.errors import ValidationError
from flynn_host.runtime import bundle, seccomp
from flynn_host.types import Job

from ..conftest import IMAGES, busybox_job, needs_root

# --- libseccomp: the syscall tables runc resolves names with -----------------------------------

# libseccomp's architecture tokens, and what the kernel puts in seccomp_data.arch for each
# (x32 shares x86_64's and marks its calls with bit 30 of the number instead)
SCMP_ARCHES = {
    "x86_64": (0xC000003E, 0xC000003E),
    "x86": (0x40000003, 0x40000003),
    "x32": (0x4000003E, 0xC000003E),
    "aarch64": (0xC00000B7, 0xC00000B7),
    "arm": (0x40000028, 0x40000028),
}
X32_BIT = 0x40000000


def libseccomp() -> ctypes.CDLL:
    """The host's libseccomp (runc's own dependency), or the test is skipped."""
    path = ctypes.util.find_library("seccomp")
    if path is None:
        pytest.skip("libseccomp is not installed")
    lib = ctypes.CDLL(path)
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
    return lib


def syscall_number(lib: ctypes.CDLL, arch: str, name: str) -> int | None:
    """The call's number on `arch` (with x32's bit), or None where it does not exist."""
    nr = lib.seccomp_syscall_resolve_name_arch(SCMP_ARCHES[arch][0], name.encode())
    return nr if nr >= 0 else None


def known_names(lib: ctypes.CDLL, arch: str) -> set[str]:
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]
    names = set()
    base = X32_BIT if arch == "x32" else 0
    # arm's private calls (set_tls, cacheflush, ...) live at 0xf0000 and up
    for nr in [*range(1100), *range(0xF0000, 0xF0010)]:
        ptr = lib.seccomp_syscall_resolve_num_arch(SCMP_ARCHES[arch][0], base + nr)
        if ptr:
            names.add(ctypes.string_at(ptr).decode())
            libc.free(ptr)
    return names


# --- the profile as data -----------------------------------------------------------------------

# what issue 9 lists, all of which the profile must refuse
ISSUE_DENIED = """
keyctl add_key request_key mount umount umount2 fsopen fsconfig fsmount fspick move_mount
open_tree mount_setattr pivot_root unshare setns kexec_load kexec_file_load bpf perf_event_open
ptrace process_vm_readv process_vm_writev kcmp init_module finit_module delete_module
create_module query_module get_kernel_syms reboot swapon swapoff acct settimeofday stime
clock_settime clock_adjtime quotactl lookup_dcookie name_to_handle_at open_by_handle_at
userfaultfd iopl ioperm uselib nfsservctl vm86 vm86old _sysctl sysfs ustat syslog vhangup mbind
set_mempolicy get_mempolicy move_pages io_uring_setup io_uring_enter io_uring_register
"""

CLONE_FLAG_NAMES = {
    0x00020000: "CLONE_NEWNS",
    0x02000000: "CLONE_NEWCGROUP",
    0x04000000: "CLONE_NEWUTS",
    0x08000000: "CLONE_NEWIPC",
    0x10000000: "CLONE_NEWUSER",
    0x20000000: "CLONE_NEWPID",
    0x40000000: "CLONE_NEWNET",
}
SIGCHLD = 17
ADDR_NO_RANDOMIZE = 0x0040000
READ_IMPLIES_EXEC = 0x0400000


def profile_refuses_personality(value: int) -> bool:
    """What the profile's personality rules decide, as runc combines them (any one matches)."""
    return any(
        (value & rule["args"][0]["value"]) == rule["args"][0]["valueTwo"]
        for rule in seccomp.personality_rules()
    )


def test_the_profile_refuses_what_the_issue_lists_and_allows_the_rest():
    profile = seccomp.default_profile("x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert seccomp.default_profile("aarch64")["architectures"] == [
        "SCMP_ARCH_AARCH64",
        "SCMP_ARCH_ARM",
    ]
    denied, *conditional = profile["syscalls"]
    assert denied == {"names": sorted(seccomp.denied_names()), "action": "SCMP_ACT_ERRNO",
                      "errnoRet": errno.EPERM}  # fmt: skip
    assert set(ISSUE_DENIED.split()) <= set(denied["names"])
    assert {"chroot", "adjtimex", "clone", "personality"}.isdisjoint(denied["names"])
    clone = [r for r in conditional if r["names"] == ["clone"]]
    assert {r["args"][0]["value"] for r in clone} == set(CLONE_FLAG_NAMES)
    assert sum(CLONE_FLAG_NAMES) == 0x7E020000
    for rule in clone:  # each flag on its own: refused when (flags & flag) == flag
        assert rule["args"] == [{"index": 0, "value": rule["args"][0]["value"],
                                 "valueTwo": rule["args"][0]["value"],
                                 "op": "SCMP_CMP_MASKED_EQ"}]  # fmt: skip
    assert [r for r in conditional if r["names"] == ["clone3"]] == [
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS}
    ]
    assert all(r["action"] == "SCMP_ACT_ERRNO" for r in profile["syscalls"])


def test_personality_rules_allow_the_query_and_refuse_every_layout_flag():
    for value in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF, 1, 6):
        assert not profile_refuses_personality(value), hex(value)
    flags = [1 << i for i in range(32) if (1 << i) & seccomp.PERSONALITY_FLAGS]
    assert ADDR_NO_RANDOMIZE in flags and READ_IMPLIES_EXEC in flags
    for flag in flags:
        assert profile_refuses_personality(flag)
        assert profile_refuses_personality(flag | 0x8)
        # junk bits must not smuggle a flag through: everything but one bit set
        for bit in range(32):
            value = 0xFFFFFFFF & ~(1 << bit)
            if value & flag:
                assert profile_refuses_personality(value), hex(value)


def test_every_call_libseccomp_knows_is_decided():
    """A call a newer kernel (and libseccomp) adds is allowed by the deny-list until someone
    puts it in DENIED or ALLOWED: this fails first."""
    lib = libseccomp()
    denied = seccomp.denied_names()
    assert not denied & seccomp.ALLOWED
    assert not set(seccomp.CONDITIONAL) & (denied | seccomp.ALLOWED)
    decided = denied | seccomp.ALLOWED | set(seccomp.CONDITIONAL)
    for arch in SCMP_ARCHES:
        undecided = known_names(lib, arch) - decided
        assert not undecided, f"{arch}: put these in seccomp.DENIED or ALLOWED: {undecided}"


def job_json(**config: Any) -> dict[str, Any]:
    return {
        "id": "h1-job",
        "mountspecs": [
            {"url": "file:///l.squashfs", "size": 1, "hashes": {"sha512_256": "0" * 64}}
        ],
        "config": {"args": ["true"], **config},
    }


def spec_of(raw: dict[str, Any]) -> dict[str, Any]:
    settings = bundle.HostSettings(host_id="h1", cgroup_parent="flynn/h1", init_path="/tini")
    return bundle.oci_spec(Job.from_json(raw), settings, "/rootfs", {})


def test_spec_has_the_profile_and_no_new_privileges_unless_asked_otherwise():
    spec = spec_of(job_json())
    assert spec["linux"]["seccomp"] == seccomp.default_profile()
    assert spec["process"]["noNewPrivileges"] is True
    assert spec_of(job_json(seccomp="default"))["linux"]["seccomp"] == seccomp.default_profile()
    assert spec_of(job_json(no_new_privileges=False))["process"]["noNewPrivileges"] is False
    unconfined = spec_of({**job_json(seccomp="unconfined"), "partition": "system"})
    assert "seccomp" not in unconfined["linux"]


@pytest.mark.parametrize(
    ("partition", "config", "field"),
    [
        ("user", {"seccomp": "unconfined"}, "config.seccomp"),
        ("background", {"seccomp": "unconfined"}, "config.seccomp"),
        (None, {"seccomp": "unconfined"}, "config.seccomp"),
        ("system", {"seccomp": "off"}, "config.seccomp"),
        ("system", {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}, "config.seccomp"),
        ("user", {"no_new_privileges": "false"}, "config.no_new_privileges"),
        ("user", {"no_new_privileges": 0}, "config.no_new_privileges"),
    ],
)
def test_invalid_seccomp_settings_name_the_field(partition, config, field):
    raw = job_json(**config)
    if partition:
        raw["partition"] = partition
    with pytest.raises(ValidationError) as err:
        Job.from_json(raw)
    assert err.value.field == field


# --- real jobs ---------------------------------------------------------------------------------

KEY_SPEC_USER_KEYRING = -4
KEYCTL_GET_KEYRING_ID, KEYCTL_UNLINK, KEYCTL_SEARCH, KEYCTL_INVALIDATE = 0, 9, 10, 21

# Runs in the job: each call in a child of its own (an unconfined unshare or personality must
# not change what the next call sees), printing {label: [return value, errno]} as JSON.
# Arguments: an int, a str (passed as a C string), ["buf", n] (n zero bytes) or "pid".
PROBE = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def arg(a):
    if a == "pid":
        return ctypes.c_long(os.getpid())
    if isinstance(a, str):
        return ctypes.c_char_p(a.encode())
    if isinstance(a, list):
        return ctypes.create_string_buffer(a[1])
    return ctypes.c_long(a)
results = {}
for label, nr, args in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        ret = libc.syscall(ctypes.c_long(nr), *[arg(a) for a in args])
        if ret == 0 and label.startswith("clone"):
            os._exit(0)  # the new process of a clone that got through
        err = ctypes.get_errno() if ret == -1 else 0
        if label.startswith("clone") and ret > 0:
            os.waitpid(ret, 0)
        os.write(w, json.dumps([ret, err]).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        results[label] = json.loads(f.read())
    os.waitpid(pid, 0)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
results["status"] = {k: status[k].strip() for k in ("Seccomp", "NoNewPrivs")}
print(json.dumps(results))
"""


def probe_calls(lib: ctypes.CDLL, key_desc: str) -> tuple[list[list[Any]], set[str]]:
    """The probe's calls on this machine, and the labels of those the profile must refuse
    with EPERM. Arguments are ones that fail or do nothing even for a process with every
    capability, so the unconfined run changes nothing outside its own children (but add_key)."""
    arch = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine())
    if arch is None:
        pytest.skip(f"no probe for {platform.machine()}")
    tmp = ["buf", 256]
    special: dict[str, list[Any]] = {
        "add_key": ["user", key_desc, "x", 1, KEY_SPEC_USER_KEYRING],
        "request_key": ["user", f"{key_desc}-absent", 0, KEY_SPEC_USER_KEYRING],
        "keyctl": [KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0],
        "umount2": ["/nonexistent", 0],
        "open_tree": [-100, "/", 0],  # AT_FDCWD: an O_PATH fd, no privilege needed
        "unshare": [0x10000000],  # CLONE_NEWUSER
        "setns": [-1, 0],
        "kexec_load": [0, 1000, 0, 0],  # more segments than the kernel takes
        "kexec_file_load": [-1, -1, 0, 0, 0],
        "finit_module": [-1, "", 0],
        "ptrace": [2, 0, 0, 0],  # PEEKDATA of pid 0: no such process
        "process_vm_readv": ["pid", 0, 0, 0, 0, 0],  # nothing to read, from itself
        "process_vm_writev": ["pid", 0, 0, 0, 0, 0],
        "kcmp": ["pid", "pid", 0, 0, 0],  # is fd 0 fd 0
        "pidfd_getfd": [-1, 0, 0],
        "process_madvise": [-1, 0, 0, 0, 0],
        "acct": ["/nonexistent/acct"],
        "quotactl_fd": [-1, 0, 0, 0],
        "ioperm": [0, 1, 0],  # turning access off needs no capability
        "syslog": [10, 0, 0],  # SYSLOG_ACTION_SIZE_BUFFER
        "sysfs": [3],  # how many file system types
        "name_to_handle_at": [-100, "/", tmp, ["buf", 8], 0],  # a handle of size 0: too small
        "open_by_handle_at": [-1, tmp, 0],
        "userfaultfd": [1],  # UFFD_USER_MODE_ONLY
        "io_uring_setup": [1, ["buf", 120]],
        "io_uring_enter": [-1, 0, 0, 0, 0, 0],
        "io_uring_register": [-1, 0, 0, 0],
        "fsconfig": [-1, 0, 0, 0, 0],
        "fsmount": [-1, 0, 0],
        "fspick": [-1, 0, 0],
        "move_mount": [-1, 0, -1, 0, 0],
        "mount_setattr": [-1, 0, 0, 0, 0],
    }
    calls, refused = [], set()
    # the issue's list too: a name dropped from DENIED must still be probed
    for name in sorted(seccomp.denied_names() | set(ISSUE_DENIED.split())):
        nr = syscall_number(lib, arch, name)
        if nr is not None:
            calls.append([name, nr, special.get(name, [0, 0, 0, 0, 0, 0])])
            refused.add(name)
    clone = syscall_number(lib, arch, "clone")
    for flag, flag_name in CLONE_FLAG_NAMES.items():
        calls.append([f"clone({flag_name})", clone, [flag | SIGCHLD, 0, 0, 0, 0]])
        refused.add(f"clone({flag_name})")
    calls.append(["clone(SIGCHLD)", clone, [SIGCHLD, 0, 0, 0, 0]])
    calls.append(["clone3", syscall_number(lib, arch, "clone3"), [0, 0]])
    personality = syscall_number(lib, arch, "personality")
    for label, value in [("query", 0xFFFFFFFF), ("PER_LINUX32", 8),
                         ("ADDR_NO_RANDOMIZE", ADDR_NO_RANDOMIZE),
                         ("junk|ADDR_NO_RANDOMIZE", 0x80000000 | ADDR_NO_RANDOMIZE),
                         ("READ_IMPLIES_EXEC", READ_IMPLIES_EXEC)]:  # fmt: skip
        calls.append([f"personality({label})", personality, [value]])
        if profile_refuses_personality(value):
            refused.add(f"personality({label})")
    # allowed ones that touch the same ground
    calls.append(["adjtimex", syscall_number(lib, arch, "adjtimex"), [["buf", 256]]])
    calls.append(["chroot", syscall_number(lib, arch, "chroot"), ["/"]])
    return calls, refused


@pytest.fixture
def components_image(daemon) -> dict[str, Any]:
    return add_image(daemon, "components")


def add_image(daemon, name: str) -> dict[str, Any]:
    manifest = IMAGES / name / "manifest.json"
    if not manifest.exists():
        pytest.fail(f"{manifest} is missing: run `make images` first")
    return daemon.client.request(
        "POST", "/host/images", {"manifest_url": manifest.as_uri(), "name": name}
    )


def run_job(daemon, job: dict[str, Any], timeout: float = 60.0) -> tuple[dict[str, Any], str]:
    daemon.client.add_job(job)
    final = daemon.wait_job(job["id"], timeout=timeout)
    return final, daemon.run_cli("log", job["id"]).stdout


def run_probe(daemon, image, calls, **job: Any) -> dict[str, Any]:
    config = job.pop("config", {})
    job_id = daemon.new_job_id()
    final, out = run_job(daemon, {
        "id": job_id, "mountspecs": image["mountspecs"], **job,
        "config": {"args": ["python3", "-c", PROBE, json.dumps(calls)], **config},
    })  # fmt: skip
    assert final["status"] == "done", (final, out)
    return json.loads(out.splitlines()[-1])


def keyctl(op: int, *args: Any) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = syscall_number(libseccomp(), platform.machine(), "keyctl")
    assert nr is not None
    c_args = [ctypes.c_char_p(a.encode()) if isinstance(a, str) else ctypes.c_long(a)
              for a in args]  # fmt: skip
    return libc.syscall(ctypes.c_long(nr), ctypes.c_long(op), *c_args)


def host_user_key(desc: str) -> int:
    """The id of the "user" key `desc` in this (root) user's keyring on the host, or -1."""
    return keyctl(KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", desc, 0)


@pytest.fixture
def key_desc() -> Iterator[str]:
    """A name for the probe's add_key; whatever happened, no such key is left in the host
    root's keyring afterwards (a job the filter failed to confine would have put it there)."""
    desc = f"flynn-seccomp-test-{uuid.uuid4().hex}"
    yield desc
    key = host_user_key(desc)
    if key > 0:
        keyctl(KEYCTL_UNLINK, key, KEY_SPEC_USER_KEYRING)
        keyctl(KEYCTL_INVALIDATE, key)  # gone already once unlinked; if not, now
    assert host_user_key(desc) == -1


@needs_root
def test_a_job_cannot_make_the_denied_calls(daemon, components_image, key_desc):
    calls, refused = probe_calls(libseccomp(), key_desc)
    result = run_probe(daemon, components_image, calls)
    assert result.pop("status") == {"Seccomp": "2", "NoNewPrivs": "1"}
    wrong = {label: result[label] for label in refused if result[label] != [-1, errno.EPERM]}
    assert not wrong, f"not refused with EPERM: {wrong}"
    assert result["clone3"] == [-1, errno.ENOSYS]  # so that glibc falls back to clone
    allowed = {label: r for label, r in result.items() if label not in refused | {"clone3"}}
    assert set(allowed) == {"clone(SIGCHLD)", "personality(query)", "personality(PER_LINUX32)",
                            "adjtimex", "chroot"}  # fmt: skip
    assert all(ret >= 0 for ret, _ in allowed.values()), allowed


@needs_root
def test_the_same_probe_gets_through_in_an_unconfined_system_job(
    daemon, components_image, key_desc
):
    """Proves the probe can fail: without the filter the calls reach the kernel, and add_key
    puts a key into the host root's own keyring (removed again by the fixture)."""
    calls, _ = probe_calls(libseccomp(), key_desc)
    opt_out = {"seccomp": "unconfined", "no_new_privileges": False}
    result = run_probe(daemon, components_image, calls, partition="system", config=opt_out)
    assert result.pop("status") == {"Seccomp": "0", "NoNewPrivs": "0"}
    key = result["add_key"][0]
    assert key > 0 and host_user_key(key_desc) == key  # the job wrote into the host's keyring
    assert result["keyctl"][0] > 0
    assert result["request_key"] == [-1, errno.ENOKEY]
    assert result["clone3"][1] != errno.ENOSYS
    # calls no capability guards, which only the filter refuses
    for label in ("unshare", "clone(CLONE_NEWUSER)", "process_vm_readv", "kcmp",
                  "personality(ADDR_NO_RANDOMIZE)", "personality(junk|ADDR_NO_RANDOMIZE)",
                  "open_tree", "get_mempolicy"):  # fmt: skip
        assert result[label][0] >= 0, (label, result[label])
    # reaches the file system (which may not export handles: EOPNOTSUPP on overlayfs)
    assert result["name_to_handle_at"][1] in (errno.EOVERFLOW, errno.EOPNOTSUPP)


@needs_root
def test_the_issue_reproductions_fail_in_busybox(daemon):
    job_id = daemon.new_job_id()
    script = (
        "exec 2>&1; "  # one stream: the log keeps the order the lines were written in
        "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; "
        "unshare -U -r id && echo userns-root; "
        "mkdir -p /tmp/x; unshare -U -r -m sh -c 'mount -t tmpfs none /tmp/x' && echo mounted; "
        "echo done"
    )
    final, out = run_job(daemon, busybox_job(job_id, ["sh", "-c", script]))
    assert final["status"] == "done"
    assert out.splitlines() == [
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "unshare: unshare(0x10000000): Operation not permitted",
        "unshare: unshare(0x10020000): Operation not permitted",
        "done",
    ]


# --- the filter runc loaded, read back from a job ----------------------------------------------

PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000


def loaded_filter(pid: int) -> list[tuple[int, int, int, int]]:
    """The process's (only) seccomp filter as (code, jt, jf, k) instructions."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"PTRACE_SEIZE {pid}")
    try:
        libc.ptrace(PTRACE_INTERRUPT, pid, None, None)
        os.waitpid(pid, 0x40000000)  # __WALL: the tracee has stopped
        count = libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, None, None)
        if count < 0:
            raise OSError(ctypes.get_errno(), "PTRACE_SECCOMP_GET_FILTER")
        buf = ctypes.create_string_buffer(8 * count)
        libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, None, buf)
    finally:
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    return [struct.unpack_from("=HBBI", buf.raw, 8 * i) for i in range(count)]


def run_filter(prog: list[tuple[int, int, int, int]], nr: int, arch: int, arg0: int = 0) -> int:
    """Run classic BPF as the kernel runs a seccomp filter, for struct seccomp_data
    {nr, arch, instruction_pointer, args[6]}; only the instructions libseccomp emits."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:  # and #k
            acc &= k
        elif code == 0x05:  # ja k
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # jeq, jgt, jge, jset #k
            hit = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: acc & k != 0}[code]
            pc += jt if hit else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"BPF instruction {code:#x} not understood")


@needs_root
@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks the x86 family's ABIs")
def test_the_loaded_filter_decides_every_call_on_every_x86_abi(daemon):
    lib = libseccomp()
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["sleep", "60"]))
    pid = daemon.wait_job(job_id, ("running",))["pid"]
    prog = loaded_filter(pid)
    daemon.client.stop_job(job_id)
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    for arch in ("x86_64", "x86", "x32"):
        audit = SCMP_ARCHES[arch][1]
        checked = 0
        for name in sorted(seccomp.denied_names() | seccomp.ALLOWED):
            nr = syscall_number(lib, arch, name)
            if nr is None:
                continue
            want = eperm if name in seccomp.denied_names() else RET_ALLOW
            assert run_filter(prog, nr, audit) == want, (arch, name)
            checked += 1
        assert checked > 300, arch
        clone = syscall_number(lib, arch, "clone")
        assert clone is not None
        assert run_filter(prog, clone, audit, SIGCHLD) == RET_ALLOW
        assert run_filter(prog, clone, audit, 0x003D0F00 | SIGCHLD) == RET_ALLOW  # a thread
        for flag in CLONE_FLAG_NAMES:
            assert run_filter(prog, clone, audit, flag | SIGCHLD) == eperm, (arch, hex(flag))
        clone3 = syscall_number(lib, arch, "clone3")
        assert clone3 is not None and run_filter(prog, clone3, audit) == enosys
        personality = syscall_number(lib, arch, "personality")
        assert personality is not None
        for value in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF, ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC,
                      0x80000000 | ADDR_NO_RANDOMIZE, 0xFFFFFFFE, 0xFFFBFFFF):  # fmt: skip
            want = eperm if profile_refuses_personality(value) else RET_ALLOW
            assert run_filter(prog, personality, audit, value) == want, (arch, hex(value))
    # a call of an architecture the filter does not name is not let through
    assert run_filter(prog, 0, 0xC00000B7) != RET_ALLOW


# --- opting out, and ordinary jobs -------------------------------------------------------------


@needs_root
def test_unconfined_is_refused_outside_the_system_partition(daemon):
    for extra, field in [
        ({"config": {"seccomp": "unconfined"}}, "config.seccomp"),
        ({"partition": "user", "config": {"seccomp": "unconfined"}}, "config.seccomp"),
        ({"config": {"no_new_privileges": "no"}}, "config.no_new_privileges"),
    ]:
        job = busybox_job(daemon.new_job_id(), ["true"])
        job.update({k: v for k, v in extra.items() if k != "config"})
        job["config"].update(extra["config"])
        with pytest.raises(HostAPIError) as err:
            daemon.client.add_job(job)
        assert (err.value.status, err.value.code) == (400, "validation_error")
        assert err.value.body["detail"] == {"field": field}
    assert daemon.client.list_jobs() == {}  # nothing half-made


@needs_root
def test_a_job_may_keep_its_privileges_and_still_has_the_filter(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["sh", "-c", "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; "
                                           "unshare -U id 2>&1 || echo refused"],
                      no_new_privileges=False)  # fmt: skip
    final, out = run_job(daemon, job)
    assert final["status"] == "done"
    assert out.splitlines() == ["NoNewPrivs:\t0", "Seccomp:\t2",
                                "unshare: unshare(0x10000000): Operation not permitted",
                                "refused"]  # fmt: skip


@needs_root
def test_ordinary_programs_work_under_the_profile(daemon, components_image):
    """Busybox, and the programs the platform's own jobs run: Python with threads, subprocesses
    and a process pool, git, etcd, PostgreSQL 15, Patroni."""
    job_id = daemon.new_job_id()
    final, out = run_job(daemon, busybox_job(job_id, ["sh", "-c", "seq 1 100 | grep 7 | wc -l"]))
    assert (final["status"], out) == ("done", "19\n")
    script = r"""set -e
python3 -c '
import asyncio, multiprocessing, subprocess, threading
out = []
threads = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
with multiprocessing.Pool(2) as pool:
    squares = pool.map(abs, [-2, -3])
async def run():
    return (await asyncio.create_subprocess_exec("true")).pid > 0
print("python", sorted(out), subprocess.check_output(["echo", "sub"], text=True).strip(),
      squares, asyncio.run(run()))
'
git init -q /tmp/repo && git -C /tmp/repo -c user.email=t@t -c user.name=t \
    commit -q --allow-empty -m first && echo "git $(git -C /tmp/repo rev-list --count HEAD)"
etcd --data-dir /tmp/etcd --listen-client-urls http://127.0.0.1:23790 \
    --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
    >/tmp/etcd.log 2>&1 &
etcd=$!
export ETCDCTL_API=3
for i in $(seq 100); do etcdctl --endpoints 127.0.0.1:23790 put k v >/dev/null 2>&1 && break; \
    sleep 0.1; done
echo "etcd $(etcdctl --endpoints 127.0.0.1:23790 get k --print-value-only)"
kill $etcd
mkdir /tmp/pg && chown postgres /tmp/pg
pg=/usr/lib/postgresql/15/bin
runuser -u postgres -- $pg/initdb -D /tmp/pg/data >/dev/null 2>&1
runuser -u postgres -- $pg/pg_ctl -D /tmp/pg/data -o "-k /tmp/pg -c listen_addresses=" -w \
    start >/dev/null
echo "postgres $(runuser -u postgres -- psql -h /tmp/pg -tAc 'select 40 + 2')"
runuser -u postgres -- $pg/pg_ctl -D /tmp/pg/data -w stop >/dev/null
patroni --version
"""
    job_id = daemon.new_job_id()
    final, out = run_job(daemon, {
        "id": job_id, "mountspecs": components_image["mountspecs"],
        "config": {"args": ["sh", "-c", script]},
        "resources": {"temp_disk": {"limit": 512 * 1024 * 1024}},
    }, timeout=120)  # fmt: skip
    assert final["status"] == "done", out
    assert out.splitlines() == [
        "python [0, 1, 2, 3] sub [2, 3] True",
        "git 1",
        "etcd v",
        "postgres 42",
        "patroni 3.0.2",
    ]


@needs_root
def test_the_stack_languages_work_under_the_profile(daemon):
    """What user apps run on (the `stack` image): Node.js, Ruby, PHP, Java and Go, each starting
    a thread or its equivalent."""
    image = add_image(daemon, "stack")
    script = r"""set -e
node -e 'require("fs").readFile("/etc/hostname", () => console.log("node", 1 + 1))'
ruby -e 'puts "ruby #{Thread.new { 2 }.value}"'
php -r 'echo "php ", 1 + 1, "\n";'
printf 'public class Hi { public static void main(String[] a) throws Exception {
  Thread t = new Thread(() -> {}); t.start(); t.join(); System.out.println("java 2"); } }\n' \
    > /tmp/Hi.java
java /tmp/Hi.java
mkdir /tmp/go && cd /tmp/go && printf 'package main
import "fmt"
func main() { c := make(chan int); go func() { c <- 2 }(); fmt.Println("go", <-c) }\n' > main.go
HOME=/tmp GOCACHE=/tmp/gocache GOPATH=/tmp/gopath go run main.go
"""
    job_id = daemon.new_job_id()
    final, out = run_job(daemon, {
        "id": job_id, "mountspecs": image["mountspecs"], "config": {"args": ["sh", "-c", script]},
        "resources": {"temp_disk": {"limit": 1024 * 1024 * 1024}},
    }, timeout=180)  # fmt: skip
    assert final["status"] == "done", out
    assert out.splitlines() == ["node 2", "ruby 2", "php 2", "java 2", "go 2"]
