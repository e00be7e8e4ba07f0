# hello: the smallest test: user space runs and system calls return. Facts: kernel, pid.
bulkhead_test() {
	local kernel
	read -r kernel </proc/sys/kernel/osrelease || fail "cannot read /proc" || return
	fact kernel "$kernel"
	fact pid "$$"
	return 0
}
