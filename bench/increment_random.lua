-- POST /increment over 10,000 random keys, value 1: many distinct keys per flush.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
math.randomseed(os.time())
request = function()
  return wrk.format(nil, "/increment", nil, '{"key":"rnd-' .. math.random(0, 9999) .. '","value":1}')
end
