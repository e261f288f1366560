-- GET /api/verve/accept?id=<n> with a new id on every request (ids start at os.time() * 1e6, so the warm-up run and
-- the measured run never share one): each request is a new id for the window, the worst case for memory and flushes.
-- Every response must be 200 "ok". bench/run.py then checks PostgreSQL holds one row per completed request.
local next_id = os.time() * 1000000
request = function()
  next_id = next_id + 1
  return wrk.format("GET", string.format("/api/verve/accept?id=%.0f", next_id))
end
