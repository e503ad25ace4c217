# Sourced by the measurement scripts (callgrind-fixed-run, paced-cpu): a mock cluster in its own
# process and a redis-server without persistence, both on free loopback ports, stopped when the
# script exits. Needs $dedupd and $out set.
#
#   start_local_servers TOPIC:PARTITIONS    # sets $bootstrap and $port
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start_local_servers() {
  # A reused OUT directory keeps the last run's FIFO: make it anew.
  rm -f "$out/mock.fifo"
  mkfifo "$out/mock.fifo"
  "$dedupd" mock-kafka --brokers 1 --topic "$1" >"$out/mock.fifo" 2>"$out/mock.err" &
  pids+=($!)
  exec 3<"$out/mock.fifo"
  read -r bootstrap <&3
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$out" --daemonize no >"$out/redis.log" &
  pids+=($!)
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
}
