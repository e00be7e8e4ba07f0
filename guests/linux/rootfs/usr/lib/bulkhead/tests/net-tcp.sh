# net-tcp: TCP both ways between the guest and an HTTP peer on the host side of eth0. The guest
# fetches a file (busybox wget), checks its size and checksum, then serves it (busybox httpd,
# which sends with sendfile) and asks the peer to pull it back; the peer checks the bytes and
# answers with what it saw. Meant to run while the host kills the net service: TCP must
# recover on its own.
#
# Parameters: server (10.0.2.1:8080, the peer), port (8081, where the guest serves), bytes and
# sha256 (what the peer will send; checked when given), timeout (300 s per transfer).
# Facts: features (the virtio feature bits eth0's driver negotiated, bit 0 first, as in
# /sys/bus/virtio/devices/*/features), fetched_bytes, fetched_sha256, fetch_s, pulled (the
# peer's verdict on the bytes it pulled back), pull_s.
bulkhead_test() {
	local server port limit features sum size t0 httpd verdict
	param server 10.0.2.1:8080
	server=$REPLY
	param port 8081
	port=$REPLY
	param timeout 300
	limit=$REPLY
	read -r features </sys/class/net/eth0/device/features || features=unknown
	fact features "$features"
	mkdir -p /run/net-tcp
	uptime_s
	t0=$REPLY
	# wget moves 64 KiB per system call; the file lands in RAM (/run is a ramfs). (Not wget -T:
	# Debian's busybox 1.35 wget crashes on it; `timeout` bounds the wait instead.)
	timeout "$limit" wget -q -O /run/net-tcp/data.bin "http://$server/data" ||
		fail "GET http://$server/data failed" || return
	uptime_s
	fact fetch_s $((REPLY - t0))
	sum=$(sha256sum </run/net-tcp/data.bin)
	sum=${sum%% *}
	size=$(wc -c </run/net-tcp/data.bin)
	fact fetched_bytes "$size"
	fact fetched_sha256 "$sum"
	param bytes ""
	[ -z "$REPLY" ] || [ "$REPLY" = "$size" ] || fail "fetched $size bytes, expected $REPLY" || return
	param sha256 ""
	[ -z "$REPLY" ] || [ "$REPLY" = "$sum" ] || fail "checksum mismatch" || return
	# The other direction. (wget --post-file cannot: it sends a file only up to its first NUL.)
	# Under PVM the guest kernel is slow to process each ACK, so TCP's pacing would cut its TSO
	# frames down to the minimum of 2 segments: let each frame carry up to 64 KiB instead.
	echo 44 >/proc/sys/net/ipv4/tcp_min_tso_segs
	uptime_s
	t0=$REPLY
	httpd -f -p "$port" -h /run/net-tcp &
	httpd=$!
	verdict=$(timeout "$limit" wget -q -O - "http://$server/pull")
	kill "$httpd"
	rm -rf /run/net-tcp
	uptime_s
	fact pull_s $((REPLY - t0))
	fact pulled "${verdict:-none}"
	[ "$verdict" = ok ] || fail "the peer did not get the file back intact" || return
	return 0
}
