-- POST /increment over 10 fixed keys, value 1: the classic "basic" benchmark. Every response must be 202.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {}
for i = 0, 9 do
  bodies[i] = '{"key":"key-' .. i .. '","value":1}'
end
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/increment", nil, bodies[n % 10])
end

-- bench/run.py reads the tail from this line (wrk --latency prints no 99.9th percentile)
done = function(summary, latency, requests)
  io.write(string.format("tail-us p99=%d p999=%d max=%d\n", latency:percentile(99), latency:percentile(99.9), latency.max))
end
