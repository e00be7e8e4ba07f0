# Bulkhead guest-side test library, sourced by /init and /usr/bin/bulkhead-test.
#
# A test is /usr/lib/bulkhead/tests/NAME.sh defining `bulkhead_test`, which returns 0 for a
# pass. It records what it saw with `fact KEY VALUE` and why it failed with `fail TEXT`, and
# reads its parameters with `param KEY DEFAULT` (into $REPLY). Every test ends in one line on
# the console that the host parses:
#
#   bulkhead-result: test=NAME status=pass|fail|error seconds=N KEY=VALUE ... end
#
# Values never contain spaces. On PVM hosts every fork+exec costs about a second and every
# system call about a millisecond: the helpers here are shell built-ins only, and tests move
# data in big blocks (dd bs=1M) with few processes, and put a timeout on every wait.

bulkhead_args=
read -r bulkhead_cmdline </proc/cmdline

# param KEY DEFAULT: sets REPLY to KEY=VALUE from bulkhead-test's arguments, else to
# bulkhead.KEY=VALUE from the kernel command line, else to DEFAULT.
param() {
	local w
	REPLY=$2
	for w in $bulkhead_cmdline; do
		case $w in "bulkhead.$1="*) REPLY=${w#"bulkhead.$1="} ;; esac
	done
	for w in $bulkhead_args; do
		case $w in "$1="*) REPLY=${w#"$1="} ;; esac
	done
}

# fact KEY VALUE: adds KEY=VALUE to the result line (spaces in VALUE become underscores).
fact() {
	local v=$2
	bulkhead_facts="$bulkhead_facts $1=${v// /_}"
}

# fail TEXT: records why the test failed (the last reason wins) and returns 1, so that
# `command || fail "why" || return` ends the test with a fail.
fail() {
	fact reason "$*"
	return 1
}

# uptime_s: sets REPLY to the whole seconds since boot.
uptime_s() {
	read -r REPLY _ </proc/uptime
	REPLY=${REPLY%.*}
}

# diagnose: after a failed test, what the guest's kernel saw of its devices' interrupts (how
# many each IRQ took; how many of them its handler found nothing behind, in /proc/irq/N/spurious)
# and of eth0's traffic, in lines before the result line, for whoever reads the console.
diagnose() {
	local f v l
	echo "bulkhead-diag: /proc/interrupts"
	cat /proc/interrupts
	# IRQs 4-7: the console's, and the first virtio devices' (built-ins only: no process each).
	for f in /proc/irq/[4-7]/spurious; do
		[ -r "$f" ] || continue
		v=
		while read -r l; do v="$v $l;"; done <"$f"
		echo "bulkhead-diag: $f:$v"
	done
	for f in rx_packets tx_packets rx_dropped tx_dropped; do
		read -r v </sys/class/net/eth0/statistics/$f 2>/dev/null && echo "bulkhead-diag: eth0 $f $v"
	done
}

# bulkhead_run_test NAME [KEY=VALUE]...: runs one test and prints its result line.
# Returns 0 for a pass, 1 for a fail, 2 for an unknown test.
bulkhead_run_test() {
	local name=$1 script t0 status rc
	shift
	bulkhead_args="$*"
	bulkhead_facts=
	case $name in
	"" | *[!a-z0-9-]*)
		echo "bulkhead-result: test=${name// /_} status=error reason=bad_test_name end"
		return 2
		;;
	esac
	script=/usr/lib/bulkhead/tests/$name.sh
	if [ ! -f "$script" ]; then
		echo "bulkhead-result: test=$name status=error reason=unknown_test end"
		return 2
	fi
	uptime_s
	t0=$REPLY
	echo "bulkhead-guest: test $name starting"
	. "$script"
	if bulkhead_test; then status=pass; rc=0; else status=fail; rc=1; diagnose; fi
	uptime_s
	echo "bulkhead-result: test=$name status=$status seconds=$((REPLY - t0))$bulkhead_facts end"
	return $rc
}
