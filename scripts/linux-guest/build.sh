#!/usr/bin/env bash
# Builds ringvisor's Linux guest: a small x86_64 kernel (uncompressed vmlinux, booted through
# its PVH note) from Debian's linux-source package, and an uncompressed newc initramfs with
# Debian's busybox-static and the project's /init (init.c). See docs/linux-guest.md.
#
#   scripts/linux-guest/build.sh [--pvm-host | --no-pvm-host] [--no-install] [--print-dir]
#
# --pvm-host     apply the guest-kernel workarounds for a PVM host (patches/pvm-host/*.patch,
#                each explained in its own comments and in docs/linux-guest.md). The default
#                is to apply them when /sys/module/kvm_pvm exists (this machine's /dev/kvm is PVM).
# --no-install   do not apt-get install missing packages (fail instead).
# --print-dir    print only the output directory.
#
# The result is cached outside the repository, in
#   ${RINGVISOR_LINUX_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringvisor/linux-guest}/<version>-<hash>
# where <hash> covers the config fragment, the patches, init.c and this script: a second run
# with the same inputs only prints the paths. The directory holds `vmlinux`, `initramfs.cpio`,
# `cmdline` (the kernel command line for the host it was built for) and `build.log`.
# Output (stdout): `dir=...`, `vmlinux=...`, `initramfs=...`, `cmdline=...`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pvm=auto
install=1
print_dir=0
for arg in "$@"; do
    case "$arg" in
        --pvm-host) pvm=1 ;;
        --no-pvm-host) pvm=0 ;;
        --no-install) install=0 ;;
        --print-dir) print_dir=1 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
if [ "$pvm" = auto ]; then
    if [ -d /sys/module/kvm_pvm ]; then pvm=1; else pvm=0; fi
fi

log() { echo "linux-guest: $*" >&2; }

# --- packages -----------------------------------------------------------------------------
need_pkgs=()
src_tar="$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n1 || true)"
if [ -z "$src_tar" ]; then
    # The newest linux-source-X.Y this Debian release offers.
    src_pkg="$(apt-cache search --names-only '^linux-source-[0-9.]+$' | awk '{print $1}' | sort -V | tail -n1)"
    [ -n "$src_pkg" ] || { log "no linux-source package in apt"; exit 1; }
    need_pkgs+=("$src_pkg")
fi
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
for tool in gcc:build-essential make:build-essential bc:bc bison:bison flex:flex cpio:cpio xz:xz-utils; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool#*:}")
done
for pkg in libelf-dev libssl-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    [ "$install" = 1 ] || { log "missing packages: ${need_pkgs[*]}"; exit 1; }
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; }
    src_tar="$(ls /usr/src/linux-source-*.tar.xz | sort -V | tail -n1)"
fi
busybox=/bin/busybox   # from busybox-static (statically linked)

# --- cache key ------------------------------------------------------------------------------
src_ver="$(basename "$src_tar" .tar.xz)"                     # linux-source-6.1
pkg_ver="$(dpkg-query -W -f='${Version}' "$src_ver" 2>/dev/null || echo unknown)"
patches=()
if [ "$pvm" = 1 ]; then
    while IFS= read -r p; do patches+=("$p"); done < <(ls "$here"/patches/pvm-host/*.patch | sort)
fi
key="$( { echo "$pkg_ver pvm=$pvm"; cat "$here/config.fragment" "$here/init.c" "${BASH_SOURCE[0]}";
          for p in "${patches[@]}"; do cat "$p"; done;
          sha256sum "$busybox" | cut -d' ' -f1; gcc --version | head -1; } | sha256sum | cut -c1-12)"
cache_root="${RINGVISOR_LINUX_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringvisor/linux-guest}"
tag="${src_ver#linux-source-}-${pkg_ver}"
[ "$pvm" = 1 ] && tag="$tag-pvm"
out="$cache_root/$tag-$key"
# The unpacked, patched source tree (and its objects) is shared by every build with the same
# source package and patches: a config change rebuilds incrementally.
src_key="$( { echo "$pkg_ver pvm=$pvm"; for p in "${patches[@]}"; do cat "$p"; done; } | sha256sum | cut -c1-12)"
src="$cache_root/src-$tag-$src_key"
mkdir -p "$out"

if [ "$pvm" = 1 ]; then
    # What this host's CPL0 emulator cannot run, turned off on the command line (pvm-host.md).
    cmdline="console=ttyS0 rdinit=/init noxsave clearcpuid=smap,pku,fsgsbase,rdpid,invpcid,pcid,popcnt,rdtscp nofsgsbase nopcid noinvpcid mitigations=off clocksource=kvm-clock rcupdate.rcu_cpu_stall_suppress=1"
else
    cmdline="console=ttyS0 rdinit=/init mitigations=off"
fi

report() {
    if [ "$print_dir" = 1 ]; then echo "$out"; exit 0; fi
    echo "dir=$out"
    echo "vmlinux=$out/vmlinux"
    echo "initramfs=$out/initramfs.cpio"
    echo "cmdline=$(cat "$out/cmdline")"
}

exec 9>"$out/.lock"
flock 9
if [ -s "$out/vmlinux" ] && [ -s "$out/initramfs.cpio" ] && [ -s "$out/cmdline" ]; then
    report
    exit 0
fi

start=$(date +%s)
# --- kernel ---------------------------------------------------------------------------------
exec 8>"$src.lock"
flock 8
if [ ! -f "$src/.unpacked" ]; then
    log "unpacking $src_tar into $src"
    rm -rf "$src" "$src.unpack"
    mkdir -p "$src.unpack"
    tar -xf "$src_tar" -C "$src.unpack"
    mv "$src.unpack/$src_ver" "$src"
    rmdir "$src.unpack"
    for p in "${patches[@]}"; do
        log "patch $(basename "$p")"
        patch -d "$src" -p1 --no-backup-if-mismatch < "$p" >&2
    done
    touch "$src/.unpacked"
fi
log "configuring (tinyconfig + config.fragment)"
make -C "$src" -s ARCH=x86_64 tinyconfig >&2
grep -v '^#' "$here/config.fragment" | grep . >> "$src/.config" || true
grep '^# CONFIG_.* is not set' "$here/config.fragment" >> "$src/.config" || true
make -C "$src" -s ARCH=x86_64 olddefconfig >&2
missing=0
while IFS= read -r want; do
    if ! grep -qx "$want" "$src/.config"; then log "config lost: $want"; missing=1; fi
done < <(grep '^CONFIG_' "$here/config.fragment")
[ "$missing" = 0 ] || { log "the config fragment does not hold after olddefconfig"; exit 1; }
jobs="${RINGVISOR_LINUX_GUEST_JOBS:-2}"
log "make -j$jobs vmlinux (several minutes; log: $out/build.log)"
if ! nice -n 5 make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux > "$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log" >&2
    log "kernel build failed (log: $out/build.log)"
    exit 1
fi
grep -q 'Xen' <(readelf -n "$src/vmlinux" 2>/dev/null) \
    || { log "vmlinux has no Xen PVH note (is CONFIG_PVH set?)"; exit 1; }

# --- initramfs ------------------------------------------------------------------------------
log "building init and the initramfs"
gcc -static -O2 -Wall -Wextra -o "$out/init" "$here/init.c"
gcc -O2 -o "$out/gen_init_cpio" "$src/usr/gen_init_cpio.c"
list="$out/initramfs.list"
{
    echo "dir /dev 0755 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "dir /proc 0755 0 0"
    echo "dir /sys 0755 0 0"
    echo "dir /tmp 1777 0 0"
    echo "dir /bin 0755 0 0"
    echo "file /init $out/init 0755 0 0"
    echo "file /bin/busybox $busybox 0755 0 0"
    echo "slink /bin/rv-poweroff /init 0777 0 0"
    # Few applets: every file costs emulated kernel time when the initramfs is unpacked.
    for applet in sh cat echo ls uname mount sleep; do
        echo "slink /bin/$applet busybox 0777 0 0"
    done
} > "$list"
"$out/gen_init_cpio" "$list" > "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
cp "$src/.config" "$out/config"
cp "$src/vmlinux" "$out/vmlinux.tmp"
mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$cmdline" > "$out/cmdline"
log "built in $(( $(date +%s) - start )) s"
report
