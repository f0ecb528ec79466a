// Gavel's watch page: one auction, live, in a browser.
//
// The auction id and the bearer token come from the URL fragment
// (/watch#auction=<id>&token=<jwt>). A fragment is never sent to a server,
// so the token appears in no request line and no access log. The rest is
// the public API, used as any client uses it:
// - GET /api/auctions/{id}: the view, and the server's clock
//   (Gavel-Server-Time);
// - GET /api/auctions/{id}/events: every later version, read with fetch()
//   because EventSource cannot send an Authorization header;
// - POST /api/auctions/{id}/bids and GET /api/bids/{id}: the viewer's bids.
// Time left is counted on the server's clock, never on the browser's.

const fragment = new URLSearchParams(location.hash.slice(1));
const auctionId = fragment.get('auction') || '';
const token = fragment.get('token') || '';

const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 15000;
// Answers to a stream request that a later attempt may not get.
const RETRYABLE = new Set([408, 429, 500, 502, 503, 504]);
// A bid's statuses in the only order they can change in; a read that
// would move a bid back (an older copy) is not shown.
const STATUS_RANK = { pending: 0, leading: 1, outbid: 2, rejected: 2, won: 3, lost: 3 };
const REASON_PHRASES = { 200: 'OK', 201: 'Created', 202: 'Accepted' };

const $ = (id) => document.getElementById(id);
const numbers = new Intl.NumberFormat('en-US');

// The latest auction view shown.
let view = null;
// Soft-close extensions seen since the page was opened, and the end it
// showed first.
let extensions = 0;
let firstEndsAt = null;

// ---- The server's clock ----

// Every server timestamp is a lower bound of the server's time when it
// arrives (it was written before it was sent), so the tightest one wins.
// Counting on from performance.now() keeps the estimate immune to changes
// of the browser's own clock.
const serverClock = {
  base: null,
  observe(text) {
    const at = Date.parse(text);
    if (Number.isNaN(at)) return;
    const base = at - performance.now();
    if (this.base === null || base > this.base) this.base = base;
  },
  now() {
    return this.base === null ? null : this.base + performance.now();
  },
};

// ---- The API ----

function api(path, options = {}) {
  return fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token}`, ...options.headers },
    cache: 'no-store',
    credentials: 'omit',
  });
}

// What a problem+json answer says (or what can be said without one).
async function problemOf(response) {
  const problem = { status: response.status, detail: response.statusText || 'request failed', code: '' };
  try {
    const body = await response.json();
    problem.detail = body.detail || body.title || problem.detail;
    problem.code = body.code || '';
  } catch {
    // Not JSON: the status says it all.
  }
  const retryAfter = Number(response.headers.get('Retry-After'));
  problem.retryAfterS = retryAfter > 0 ? retryAfter : null;
  return problem;
}

function describeProblem(problem) {
  const code = problem.code ? ` (${problem.code})` : '';
  const retry = problem.retryAfterS ? `; retry in ${problem.retryAfterS} s` : '';
  return `${problem.status}: ${problem.detail}${code}${retry}`;
}

// ---- Server-Sent Events over fetch() ----

// The blocks of a text/event-stream body, parsed as the HTML standard
// says: lines end in CR, LF or CRLF, a blank line ends a block, `:` starts
// a comment, `data` lines join with LF, one space after the colon is
// dropped. Yields { type, data, id } (data null for a block without one).
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const lineEnd = /\r\n|\r|\n/;
  let buffer = '';
  let block = { type: null, data: null, id: null };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      for (let match = lineEnd.exec(buffer); match; match = lineEnd.exec(buffer)) {
        // A CR that ends the buffer may be half of a CRLF.
        if (match[0] === '\r' && match.index === buffer.length - 1) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === '') {
          if (block.data !== null || block.id !== null) yield block;
          block = { type: null, data: null, id: null };
        } else {
          addField(block, line);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function addField(block, line) {
  const colon = line.indexOf(':');
  if (colon === 0) return; // a comment (keep-alive)
  const field = colon < 0 ? line : line.slice(0, colon);
  let value = colon < 0 ? '' : line.slice(colon + 1);
  if (value.startsWith(' ')) value = value.slice(1);
  if (field === 'event') block.type = value;
  else if (field === 'data') block.data = block.data === null ? value : `${block.data}\n${value}`;
  else if (field === 'id' && !value.includes('\0')) block.id = value;
}

// Follows one of the API's event streams: calls handlers[type](data) for
// each event, reconnects with Last-Event-ID after an error or a close
// (the server closes a stream when the token expires), and stops after
// `event: end` or an answer that asking again cannot change.
async function followStream(path, handlers, setState) {
  let lastEventId = null;
  let delayMs = RECONNECT_MIN_MS;
  for (;;) {
    setState(lastEventId === null ? 'connecting' : 'reconnecting');
    let waitMs = delayMs;
    try {
      const headers = { Accept: 'text/event-stream' };
      if (lastEventId !== null) headers['Last-Event-ID'] = lastEventId;
      const response = await api(path, { headers });
      if (!response.ok) {
        const problem = await problemOf(response);
        if (!RETRYABLE.has(problem.status)) {
          setState('failed', problem);
          return;
        }
        waitMs = Math.max(waitMs, (problem.retryAfterS || 0) * 1000);
        throw new Error(describeProblem(problem));
      }
      setState('live');
      delayMs = RECONNECT_MIN_MS;
      for await (const event of serverSentEvents(response.body)) {
        if (event.id !== null) lastEventId = event.id;
        if (event.data === null) continue;
        if (event.type === 'end') {
          handlers.end?.(event.data);
          setState('ended');
          return;
        }
        handlers[event.type || 'message']?.(event.data);
      }
    } catch (error) {
      console.warn(`${path}: ${error.message}`);
    }
    // Spread reconnects out, so a restart is not met by every watcher at once.
    await new Promise((resolve) => setTimeout(resolve, waitMs * (0.5 + Math.random())));
    delayMs = Math.min(delayMs * 2, RECONNECT_MAX_MS);
  }
}

// ---- Showing the auction ----

function money(amount) {
  return `${numbers.format(amount)} ${view ? view.currency : ''}`.trim();
}

function clockTime(rfc3339) {
  return new Date(rfc3339).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

// A time left: tenths of a second in the last ten seconds.
function countdown(ms) {
  if (ms < 10000) return `${(Math.ceil(ms / 100) / 10).toFixed(1)} s`;
  const total = Math.ceil(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

// A span of time in words: milliseconds under a second, tenths of a second
// under ten.
function span(ms) {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 10000) return `${(ms / 1000).toFixed(1)} s`;
  const total = Math.round(ms / 1000);
  if (total < 60) return `${total} s`;
  if (total < 3600) return `${Math.floor(total / 60)} min ${total % 60} s`;
  return `${Math.floor(total / 3600)} h ${Math.floor((total % 3600) / 60)} min`;
}

// Restarts a CSS animation on `element`.
function flash(element, className) {
  element.classList.remove(className);
  void element.offsetWidth;
  element.classList.add(className);
}

// Shows a newer auction view; an older or equal version changes nothing.
function showView(next) {
  if (next.server_time) serverClock.observe(next.server_time);
  if (view && next.version <= view.version) return;
  const previous = view;
  view = next;
  document.title = `${next.title} · Gavel`;
  $('title').textContent = next.title;
  $('currency').textContent = next.currency;
  $('amount').placeholder = next.status === 'closed' ? 'closed' : `${next.next_min_bid} or more`;
  enableBidding();
  showPrice(next, previous);
  showEnd(next, previous);
  tick();
  myBids.auctionChanged(next);
}

function showPrice(v, previous) {
  const closed = v.status === 'closed';
  const hasBids = v.current_price !== null;
  let label = hasBids ? 'Current price' : 'Starting price';
  if (closed) label = v.winner_id ? 'Sold for' : 'Closed without a sale';
  $('price-label').textContent = label;
  $('price').textContent = money(hasBids ? v.current_price : v.starting_price);
  $('leader').previousElementSibling.textContent = closed ? 'Winner' : 'Leader';
  $('leader').textContent = (closed ? v.winner_id : v.leading_bidder) || (hasBids ? 'none' : 'no bids yet');
  $('bid-count').textContent = numbers.format(v.bid_count);
  $('next-min').textContent = closed ? '—' : money(v.next_min_bid);
  const reserve = { true: 'met', false: closed ? 'not met' : 'not met yet', null: 'none' };
  $('reserve').textContent = reserve[v.reserve_price_met];
  if (previous && previous.current_price !== v.current_price) flash($('price').parentElement, 'changed');
}

// The end time, and a soft-close extension as it happens: a bid near the
// end moved ends_at later.
function showEnd(v, previous) {
  $('ends-at').textContent = clockTime(v.ends_at);
  $('soft-close').textContent = v.soft_close_s > 0
    ? `a bid in the last ${span(v.soft_close_s * 1000)} moves the end, up to ${clockTime(v.max_end_at)}`
    : 'none: the end does not move';
  firstEndsAt ??= Date.parse(v.ends_at);
  if (!previous || Date.parse(v.ends_at) <= Date.parse(previous.ends_at)) return;
  extensions += 1;
  const by = Date.parse(v.ends_at) - Date.parse(previous.ends_at);
  const all = extensions > 1
    ? `; ${extensions} extensions, ${span(Date.parse(v.ends_at) - firstEndsAt)} in all since this page opened`
    : '';
  const note = $('extension');
  note.textContent = `Extended by ${span(by)} (soft close): the end moved from `
    + `${clockTime(previous.ends_at)} to ${clockTime(v.ends_at)}${all}.`;
  note.hidden = false;
  flash($('time-left').parentElement, 'extended');
}

// Time left on the server's clock; runs ten times a second.
function tick() {
  if (!view) return;
  const label = $('time-left-label');
  const left = $('time-left');
  const now = serverClock.now();
  let ms = null;
  if (view.status === 'closed') {
    label.textContent = 'Auction';
    left.textContent = 'Closed';
  } else if (now === null) {
    left.textContent = '…';
  } else if (view.status === 'scheduled') {
    const opensInMs = Date.parse(view.starts_at) - now;
    label.textContent = 'Opens in';
    left.textContent = opensInMs > 0 ? countdown(opensInMs) : 'opening…';
  } else {
    ms = Date.parse(view.ends_at) - now;
    label.textContent = ms > 0 ? 'Time left' : 'Ended';
    // The result is final once the server settles the close.
    left.textContent = ms > 0 ? countdown(ms) : 'settling…';
  }
  // Red while a bid would move the end (the last ten seconds of a hard close).
  const ending = ms !== null && ms > 0 && ms <= Math.max(10, view.soft_close_s) * 1000;
  left.parentElement.classList.toggle('ending', ending);
}

// ---- The viewer's bids ----

const REASONS = {
  below_minimum: 'below the minimum bid',
  auction_closed: 'the auction had closed',
  auction_not_started: 'the auction had not opened',
  not_above_own_max: 'not above your own maximum',
  seller_cannot_bid: 'sellers cannot bid',
};

function describeBid(bid) {
  switch (bid.status) {
    case 'pending': return 'pending: logged, being resolved';
    case 'leading': return `leading at ${money(bid.auction_price)}`;
    case 'rejected': return `rejected: ${REASONS[bid.reason] || bid.reason}`;
    default: return bid.status;
  }
}

function showMyBid(bid) {
  const mine = $('my-bid');
  mine.dataset.status = bid.status;
  mine.textContent = `Your maximum ${money(bid.amount)}: ${describeBid(bid)}`;
}

// The viewer's own bids on this auction, shown through show(bid): the
// answers to bids placed here, and every change of the viewer's bids from
// GET /api/me/events (outbid, won, lost; from any device). The latest bid
// is shown; a bid's status never goes back (an answer may arrive after the
// stream has moved on).
function followMyBids(show) {
  let latest = null;
  let following = false;

  function keep(bid) {
    if (bid.auction_id !== auctionId) return;
    if (latest && bid.id === latest.id && STATUS_RANK[bid.status] < STATUS_RANK[latest.status]) return;
    if (latest && bid.id !== latest.id && bid.received_at < latest.received_at) return;
    latest = bid;
    show(bid);
  }

  return {
    start() {
      if (following) return;
      following = true;
      followStream('/api/me/events', {
        bid(data) { keep(JSON.parse(data)); },
      }, () => {});
    },
    placed(bid) { keep(bid); },
    auctionChanged() {},
  };
}

const myBids = followMyBids(showMyBid);

// ---- Bidding ----

// A bid whose answer never came (or said to come back): sending the same
// amount again reuses its key, so the server replays the bid if it was
// logged and never takes it twice.
let unanswered = null;
let sending = false;

function newIdempotencyKey() {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  // randomUUID needs a secure context (https or localhost); plain http
  // elsewhere still has getRandomValues: a version 4 UUID from it.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function setSending(on) {
  sending = on;
  enableBidding();
}

function enableBidding() {
  $('bid-button').disabled = sending || !view || view.status === 'closed';
}

function showAnswer(kind, text) {
  const answer = $('answer');
  answer.dataset.kind = kind;
  answer.textContent = text;
}

async function placeBid(amount) {
  const key = unanswered && unanswered.amount === amount ? unanswered.key : newIdempotencyKey();
  unanswered = { amount, key };
  setSending(true);
  showAnswer('sending', `Sending ${money(amount)}…`);
  try {
    const response = await api(`/api/auctions/${encodeURIComponent(auctionId)}/bids`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key, Prefer: 'wait=2' },
      body: JSON.stringify({ amount }),
    });
    if (!RETRYABLE.has(response.status)) unanswered = null;
    if (response.ok) {
      const bid = await response.json();
      myBids.placed(bid, response.headers.get('Gavel-Consistency-Token'));
      const phrase = REASON_PHRASES[response.status] || '';
      showAnswer('ok', `${response.status} ${phrase}: ${describeBid(bid)}`);
    } else {
      showAnswer('problem', describeProblem(await problemOf(response)));
    }
  } catch (error) {
    showAnswer('problem', `No answer (${error.message}): send the same amount again to retry this bid.`);
  } finally {
    setSending(false);
  }
}

function onSubmit(event) {
  event.preventDefault();
  if (sending) return;
  const amount = Number($('amount').value);
  if (!Number.isSafeInteger(amount) || amount < 1) {
    showAnswer('problem', 'Enter a whole amount of at least 1 (minor units).');
    return;
  }
  placeBid(amount);
}

// ---- Start ----

const CONNECTION_LABELS = {
  connecting: 'connecting…',
  live: 'live',
  reconnecting: 'reconnecting…',
  ended: 'auction over',
  failed: 'stopped',
};

function fail(message) {
  const problem = $('problem');
  problem.textContent = message;
  problem.hidden = false;
}

function setConnection(state, problem) {
  const badge = $('connection');
  badge.dataset.state = state;
  badge.textContent = CONNECTION_LABELS[state];
  if (state === 'ended') enableBidding();
  if (problem) fail(explain(problem));
}

function explain(problem) {
  if (problem.status === 401) {
    return 'The token was refused (expired or invalid): open the page again with a fresh one '
      + '(gavel token --sub YOUR_ID).';
  }
  if (problem.status === 404) return `There is no auction ${auctionId}.`;
  return describeProblem(problem);
}

// The current view, with a fresh reading of the server's clock.
async function loadView() {
  const response = await api(`/api/auctions/${encodeURIComponent(auctionId)}`);
  if (!response.ok) return problemOf(response);
  serverClock.observe(response.headers.get('Gavel-Server-Time'));
  showView(await response.json());
  return null;
}

async function main() {
  $('bid-form').addEventListener('submit', onSubmit);
  window.addEventListener('hashchange', () => location.reload());
  enableBidding();
  if (!auctionId || !token) {
    setConnection('failed');
    fail('Open this page as /watch#auction=AUCTION_ID&token=TOKEN (gavel dev prints a ready link).');
    return;
  }
  setInterval(tick, 100);
  try {
    const problem = await loadView();
    if (problem && !RETRYABLE.has(problem.status)) {
      setConnection('failed', problem);
      return;
    }
  } catch (error) {
    console.warn(`loading the auction: ${error.message}`); // the stream retries
  }
  myBids.start();
  followStream(`/api/auctions/${encodeURIComponent(auctionId)}/events`, {
    auction: (data) => showView(JSON.parse(data)),
  }, setConnection);
}

main();
