# disk-verify: copies random data into a file on the root file system, syncs, drops the page
# cache, reads the file back and compares checksums; then checks that the kernel logged no I/O
# error and that ext4 counted none. Meant to run while the host kills the block service.
#
# The random data comes from a second disk the host filled (/dev/vdb), or from /dev/urandom when
# there is none: under PVM the kernel's generator is emulated and makes only ~50 KiB/s.
#
# Parameters: src (/dev/vdb if it exists, else /dev/urandom), size_mib (16),
# file (/var/bulkhead-verify.bin), sha256 (the source's checksum, when the host knows it).
# Facts: size_mib, src, source_sha256, read_sha256, write_s and read_s (seconds the copy with its
# sync and the read-back took), io_errors (kernel log lines), ext4_errors.
bulkhead_test() {
	local src size file ref got t0 ioerr ext4err n f direct
	src=/dev/urandom
	[ -b /dev/vdb ] && src=/dev/vdb
	param src "$src"
	src=$REPLY
	param size_mib 16
	size=$REPLY
	param file /var/bulkhead-verify.bin
	file=$REPLY
	fact size_mib "$size"
	fact src "$src"
	if [ "$src" = /dev/urandom ]; then
		# Keep what was written, so that it can be checked: the reference copy goes to RAM (/run
		# is a ramfs) and from there to the disk.
		timeout 600 dd if=/dev/urandom of=/run/verify.src bs=1M count="$size" iflag=fullblock 2>/dev/null ||
			fail "cannot generate random data" || return
		src=/run/verify.src
	fi
	param sha256 ""
	ref=$REPLY
	if [ -z "$ref" ]; then
		ref=$(timeout 300 dd if="$src" bs=1M count="$size" 2>/dev/null | sha256sum)
		ref=${ref%% *}
	fi
	fact source_sha256 "$ref"
	uptime_s
	t0=$REPLY
	# A source disk is read with O_DIRECT: it is not what is tested, and under PVM every copy
	# through the page cache costs the emulated kernel ~0.4 s per MiB. The file is written
	# through the page cache, as programs do.
	direct=
	[ -b "$src" ] && direct=,direct
	timeout 300 dd if="$src" of="$file" bs=1M count="$size" iflag=fullblock$direct conv=fsync 2>/dev/null ||
		fail "writing $file failed" || return
	rm -f /run/verify.src
	sync
	uptime_s
	fact write_s $((REPLY - t0))
	t0=$REPLY
	echo 3 >/proc/sys/vm/drop_caches
	got=$(timeout 300 sha256sum <"$file") || fail "reading $file back failed" || return
	got=${got%% *}
	fact read_sha256 "$got"
	uptime_s
	fact read_s $((REPLY - t0))
	ioerr=$(dmesg | grep -c -e 'I/O error' -e 'EXT4-fs error' -e 'Buffer I/O')
	fact io_errors "$ioerr"
	# Every mounted ext4 file system has a directory here (the root is the only one).
	ext4err=0
	for f in /sys/fs/ext4/*/errors_count; do
		read -r n <"$f" || n=unknown
		[ "$n" = 0 ] || ext4err=$n
	done
	fact ext4_errors "$ext4err"
	[ "$got" = "$ref" ] || fail "checksum mismatch" || return
	[ "$ioerr" = 0 ] || fail "the kernel logged I/O errors" || return
	[ "$ext4err" = 0 ] || fail "ext4 counted errors" || return
	return 0
}
