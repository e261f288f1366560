-- wrk script: POST /events with arrays of 1,000 distinct events (the server needs --max-body 1048576).
-- A template of 1,000 events is built once; each request stamps a fresh prefix into every event_id.
--   wrk -t1 -c8 -d10s --latency -s bench/events_bulk.lua http://127.0.0.1:3333
local channels = {"web", "mobile_app", "api", "email", "partner"}
local counter = 0
local tag = tostring(math.random(1, 1000000000))
local items = {}
for i = 1, 1000 do
  items[i] = string.format(
    '{"event_name":"event%d","channel":"%s","user_id":"user%d","timestamp":%d,"event_id":"@-%d"}',
    math.random(1, 50), channels[math.random(1, 5)], math.random(1, 200000), os.time() - math.random(60, 3600), i)
end
local template = "[" .. table.concat(items, ",") .. "]"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  counter = counter + 1
  local body = template:gsub("@", "b" .. tag .. "-" .. counter)
  return wrk.format(nil, "/events", nil, body)
end
