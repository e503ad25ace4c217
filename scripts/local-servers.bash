# Sourced by the measurement scripts (callgrind-fixed-run, paced-cpu): a mock cluster in its own
# process and a redis-server without persistence, both on free loopback ports, stopped when the
# script exits. Needs $dedupd and $out set.
#
#   start_local_servers TOPIC:PARTITIONS    # sets $bootstrap, $port and $redis_mode
#   REDIS_MODE=cluster ...                  # a Redis Cluster of three primaries instead ($port is
#                                           # one of them; redis.mode: cluster)
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
  redis_mode=${REDIS_MODE:-standalone}
  if [ "$redis_mode" != cluster ]; then
    port=$(free_port)
    start_redis "$port"
    return
  fi
  local nodes=()
  for _ in 1 2 3; do
    local p
    p=$(free_port)
    start_redis "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf"
    nodes+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$out/cluster-create.log"
  port=${nodes[0]#127.0.0.1:}
  until redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok'; do sleep 0.1; done
}

# A free loopback port whose cluster bus port (+10000) is free too.
free_port() {
  python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p < 55536:
        b = socket.socket()
        try:
            b.bind(("127.0.0.1", p + 10000)); print(p); break
        except OSError: pass
        finally: b.close()
    s.close()'
}

start_redis() {
  local p=$1
  shift
  redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --dir "$out" --daemonize no "$@" >"$out/redis-$p.log" &
  pids+=($!)
  until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.1; done
}
