-- Bids with a unique Idempotency-Key and rising amounts (env AUCTION, TOKEN).
local counter = 0
local auction = os.getenv("AUCTION")
local token = os.getenv("TOKEN")
request = function()
  counter = counter + 1
  local key = string.format("%d-%d-%d", os.time(), math.random(1, 1000000000), counter)
  local body = string.format('{"amount": %d}', 1000000 + counter * 10 + math.random(0, 9))
  return wrk.format("POST", "/api/auctions/" .. auction .. "/bids", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = key,
  }, body)
end
