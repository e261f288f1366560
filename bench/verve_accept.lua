-- GET /api/verve/accept?id=<n> with a new id on every request (ids start at os.time() * 1e6, so the warm-up run and
-- the measured run never share one): each request is a new id for the window, the worst case for memory and flushes.
-- Every response must be 200 "ok". bench/run.py then checks PostgreSQL holds one row per completed request.
local next_id = os.time() * 1000000
request = function()
  next_id = next_id + 1
  return wrk.format("GET", string.format("/api/verve/accept?id=%.0f", next_id))
end

-- bench/run.py reads the tail from this line (wrk --latency prints no 99.9th percentile)
done = function(summary, latency, requests)
  io.write(string.format("tail-us p99=%d p999=%d max=%d\n", latency:percentile(99), latency:percentile(99.9), latency.max))
end
