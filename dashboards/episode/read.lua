-- Reads of one auction (env AUCTION, TOKEN).
local auction = os.getenv("AUCTION")
local token = os.getenv("TOKEN")
request = function()
  return wrk.format("GET", "/api/auctions/" .. auction, {["Authorization"] = "Bearer " .. token})
end
