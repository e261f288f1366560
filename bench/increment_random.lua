-- POST /increment over 10,000 random keys, value 1: many distinct keys per flush.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
math.randomseed(os.time())
request = function()
  return wrk.format(nil, "/increment", nil, '{"key":"rnd-' .. math.random(0, 9999) .. '","value":1}')
end

-- bench/run.py reads the tail from this line (wrk --latency prints no 99.9th percentile)
done = function(summary, latency, requests)
  io.write(string.format("tail-us p99=%d p999=%d max=%d\n", latency:percentile(99), latency:percentile(99.9), latency.max))
end
