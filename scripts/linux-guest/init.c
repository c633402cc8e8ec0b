// ringvisor Linux guest: /init (and /bin/poweroff) of the initramfs built by build.sh.
//
// As PID 1 it mounts /dev, /proc and /sys, prints a banner, starts a heartbeat process and an
// interactive busybox shell on the console. The heartbeat keeps a buffer it rewrites every
// period with a pattern that depends on the beat number; before each rewrite it checks every
// word written by the previous beat, so memory lost or corrupted (e.g. by a live migration) is
// reported by the guest itself:
//
//   heartbeat <n> sum <hex> bad <words that did not hold the previous beat's pattern>
//
// Parameters come from the kernel command line (Linux passes unknown `key=value` words to init
// as environment variables): rv_period_ms (1000), rv_buf_kb (2048), rv_beats (0 = forever:
// after that many beats the guest powers off with rv_status), rv_status (0), rv_shell (1).
//
// Invoked as `rv-poweroff [status]` (a link in /bin) it powers the VM off: it writes the
// status to ringvisor's exit port 0x501 (the same port as QEMU's isa-debug-exit) and falls
// back to reboot(POWER_OFF) where that port cannot be reached. Busybox's own `poweroff`,
// `reboot` and `halt` (which its shell runs in preference to any file) signal PID 1 (SIGUSR2,
// SIGTERM, SIGUSR1): init then powers off the same way with status 0.
//
// Built with the host's gcc -static -O2. Only user-space code runs here: on a host that
// emulates guest CPL0 code every system call is expensive, so the loop makes few of them.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_PORT 0x501

static long env_long(const char *key, long def)
{
	const char *v = getenv(key);
	if (!v || !*v)
		return def;
	char *end;
	long x = strtol(v, &end, 0);
	return *end ? def : x;
}

static void say(const char *s)
{
	size_t n = strlen(s);
	while (n > 0) {
		ssize_t w = write(1, s, n);
		if (w <= 0) {
			if (w < 0 && errno == EINTR)
				continue;
			return;
		}
		s += w;
		n -= (size_t)w;
	}
}

static int power_off(int status)
{
	char line[64];
	snprintf(line, sizeof line, "ringvisor-guest: poweroff %d\n", status & 0xff);
	say(line);
	// The line must leave the UART before the VM is gone: wait until the tty has sent it.
	tcdrain(1);
	sync();
	if (ioperm(EXIT_PORT, 1, 1) == 0)
		outb((unsigned char)status, EXIT_PORT);
	reboot(RB_POWER_OFF);
	return 1;
}

static volatile sig_atomic_t stop_requested;

static void on_stop_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static inline uint64_t pattern(uint64_t beat, uint64_t i)
{
	uint64_t x = (beat + 1) * 0x9e3779b97f4a7c15ull ^ (i * 0xbf58476d1ce4e5b9ull);
	x ^= x >> 31;
	return x | 1; // never zero: a page that reads back as zeros is always caught
}

static void sleep_until(struct timespec *next, long period_ms)
{
	next->tv_nsec += (period_ms % 1000) * 1000000L;
	next->tv_sec += period_ms / 1000 + next->tv_nsec / 1000000000L;
	next->tv_nsec %= 1000000000L;
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL) == EINTR)
		;
}

static void heartbeat(void)
{
	long period_ms = env_long("rv_period_ms", 1000);
	long buf_kb = env_long("rv_buf_kb", 2048);
	long beats = env_long("rv_beats", 0);
	int status = (int)env_long("rv_status", 0);
	if (period_ms < 1)
		period_ms = 1;
	if (buf_kb < 4)
		buf_kb = 4;
	size_t words = (size_t)buf_kb * 1024 / 8;
	uint64_t *buf = mmap(NULL, words * 8, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED) {
		say("ringvisor-guest: heartbeat buffer: mmap failed\n");
		_exit(1);
	}
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	char line[160];
	for (uint64_t n = 0;; n++) {
		uint64_t bad = 0, sum = 0;
		for (size_t i = 0; i < words; i++) {
			if (n > 0 && buf[i] != pattern(n - 1, i))
				bad++;
			uint64_t v = pattern(n, i);
			buf[i] = v;
			sum = (sum ^ v) * 0x100000001b3ull;
		}
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		snprintf(line, sizeof line, "heartbeat %llu sum %016llx bad %llu t %lld.%03ld\n",
			 (unsigned long long)n, (unsigned long long)sum, (unsigned long long)bad,
			 (long long)now.tv_sec, now.tv_nsec / 1000000L);
		say(line);
		if (beats > 0 && (long)n + 1 >= beats)
			_exit(power_off(status));
		sleep_until(&next, period_ms);
	}
}

static pid_t spawn_shell(void)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	signal(SIGUSR1, SIG_DFL);
	signal(SIGUSR2, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	setsid();
	int fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		ioctl(fd, TIOCSCTTY, 1);
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	char *argv[] = {"sh", NULL};
	execv("/bin/sh", argv);
	say("ringvisor-guest: exec /bin/sh failed\n");
	_exit(127);
}

static void banner(void)
{
	char online[64] = "?";
	int fd = open("/sys/devices/system/cpu/online", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, online, sizeof online - 1);
		online[n > 0 ? n : 0] = 0;
		online[strcspn(online, "\n")] = 0;
		close(fd);
	}
	char line[160];
	snprintf(line, sizeof line, "ringvisor-guest: v1 up, cpus online %s, period %ld ms, buffer %ld KiB\n",
		 online, env_long("rv_period_ms", 1000), env_long("rv_buf_kb", 2048));
	say(line);
}

int main(int argc, char **argv)
{
	const char *name = strrchr(argv[0], '/');
	name = name ? name + 1 : argv[0];
	if (strcmp(name, "rv-poweroff") == 0 || strcmp(name, "poweroff") == 0)
		return power_off(argc > 1 ? atoi(argv[1]) : 0);
	if (getpid() != 1) {
		say("usage: run as /init (pid 1), or as rv-poweroff [status]\n");
		return 2;
	}
	mkdir("/dev", 0755);
	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	setenv("PATH", "/bin", 1);
	setenv("HOME", "/", 1);
	banner();

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_stop_signal; // no SA_RESTART: wait() returns EINTR
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	pid_t beat = fork();
	if (beat == 0) {
		signal(SIGUSR1, SIG_DFL);
		signal(SIGUSR2, SIG_DFL);
		signal(SIGTERM, SIG_DFL);
		heartbeat();
	}
	pid_t shell = env_long("rv_shell", 1) ? spawn_shell() : -1;
	for (;;) {
		int st;
		if (stop_requested)
			return power_off(0);
		pid_t pid = wait(&st);
		if (pid < 0) {
			if (errno == ECHILD)
				pause();
			continue;
		}
		if (pid == beat) {
			say("ringvisor-guest: heartbeat stopped\n");
			beat = -1;
		} else if (pid == shell) {
			shell = spawn_shell();
		}
	}
}
