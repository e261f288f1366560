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
