-- wrk script: one event per POST /events, each a distinct event (its own event_id), 50 names, 5 channels,
-- 200,000 users, timestamps within the last hour.
--   wrk -t1 -c64 -d10s --latency -s bench/events_single.lua http://127.0.0.1:3333
local channels = {"web", "mobile_app", "api", "email", "partner"}
local counter = 0
local tag = tostring(math.random(1, 1000000000))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  counter = counter + 1
  local body = string.format(
    '{"event_name":"event%d","channel":"%s","user_id":"user%d","timestamp":%d,"event_id":"s%s-%d"}',
    math.random(1, 50), channels[math.random(1, 5)], math.random(1, 200000), os.time() - math.random(0, 3600),
    tag, counter)
  return wrk.format(nil, "/events", nil, body)
end
