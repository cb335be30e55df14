/* The exact search for the fastest pushed chain (swarm/client/routing.py `_hop_links`), in C; and at the end of this
   file the relayed search's pruning pass (`_bound`, route_bound).

   A chain over block boundaries 0 .. n-1 (their positions x[j]) takes links of spans: span k may carry a session
   from boundary p to a later boundary q when first[k] <= p < q <= last[k], at fixed[k] + (x[q] - x[p]) * per_block[k];
   a link of span t right after a link of span s saves saving[e] for every hop e = (s, t). The state is (boundary,
   the span whose link ends there). Walking the boundaries up, entry[k] holds the least (cost of the chain before +
   fixed[k] - x[p] * per_block[k]) over the boundaries p seen so far within k, with the span before it (the cheapest
   way into p, or a hop into k); a link of k ending at q then costs entry[k] + x[q] * per_block[k].

   It computes what the numpy version does with the same float64 operations (no contraction into fused
   multiply-adds: built with -ffp-contract=off) and the same choices among equals (the least span index among equal
   minima, a hop replacing the plain way in only when strictly cheaper, of equal hops into a span the least index),
   so both find the same chain and cost. The numpy version spends ~30 numpy calls per boundary; this one a few loads
   per span and boundary: the spans covering the current boundary are a list kept up to date as the walk goes, the
   spans numbered in the order they start (the list then reads them in ascending order); a span's hops are looked at
   only where the span arrived within its largest saving of the cheapest arrival (no other hop of it could count),
   and spans that another over the same boundaries beats whatever they save are left out first
   (`leave_out_dominated`: ~40% of a simulated 10,000-peer swarm's). It allocates no memory: fresh memory costs a
   page fault per 4 KiB, ~3 us on these virtual machines, so the caller keeps a workspace. It trusts its caller
   (swarm_kernels/route_search.py checks every index and value and sizes the workspace). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {  /* the cheapest hop into a span at the current boundary */
    double cost;      /* INFINITY (and index INT32_MAX): none yet */
    int32_t index, span;  /* the hop's index and its source */
} Offer;

typedef struct {  /* a hop, listed with the others of its source */
    int32_t target, low, high, index;  /* it can be taken at boundaries low .. high */
    double saving;
} Hop;

/* Items 0 .. count-1 in order of key (0 .. n-1; counting sort into `out`, `offsets` of n + 1 entries) */
static void bucket(int64_t n, int64_t count, const int64_t *key, int64_t *offsets, int32_t *out) {
    for (int64_t j = 0; j <= n; j++) offsets[j] = 0;
    for (int64_t i = 0; i < count; i++) offsets[key[i] + 1]++;
    for (int64_t j = 0; j < n; j++) offsets[j + 1] += offsets[j];
    for (int64_t i = 0; i < count; i++) out[offsets[key[i]]++] = (int32_t)i;
    for (int64_t j = n; j > 0; j--) offsets[j] = offsets[j - 1];  /* (the fill moved each start to the next) */
    offsets[0] = 0;
}

/* The boundaries of a search over blocks [start, end): start, end and every span's first and end block clipped to
   them, ascending, as positions x[0 .. n) (returns n); each span's first and last boundary (as numpy's searchsorted
   finds them; first = 1, last = 0 for a span outside the blocks, which takes no part). node_of: end - start + 1
   slots. */
static int64_t boundaries(int64_t start, int64_t end, int64_t m, const int64_t *starts, const int64_t *ends,
                          int64_t *node_of, double *x, int64_t *first, int64_t *last) {
    int64_t blocks = end - start, n = 0;
    for (int64_t b = 0; b <= blocks; b++) node_of[b] = 0;
    node_of[0] = node_of[blocks] = 1;
    for (int64_t k = 0; k < m; k++) {
        int64_t lo = starts[k] > start ? starts[k] : start, hi = ends[k] < end ? ends[k] : end;
        if (lo < hi) node_of[lo - start] = node_of[hi - start] = 1;
    }
    for (int64_t b = 0; b <= blocks; b++) {  /* node_of[b - start]: block b's boundary */
        if (node_of[b]) x[n] = (double)(start + b), node_of[b] = n++;
        else node_of[b] = n;
    }
    for (int64_t k = 0; k < m; k++) {
        int64_t lo = starts[k] > start ? starts[k] : start, hi = ends[k] < end ? ends[k] : end;
        if (lo < hi) first[k] = node_of[lo - start], last[k] = node_of[hi - start];
        else first[k] = 1, last[k] = 0;
    }
    return n;
}

/* Workspace (8-byte slots) that route_pushed needs for n boundaries, m spans, h hops and a log of up to `updates`
   entries */
static int64_t workspace(int64_t n, int64_t m, int64_t h, int64_t updates) {
    return 12 * m + 6 * h + 2 * (n + 1) + 2 * updates + 32;
}

/* The best chain from boundary 0 to n-1: its links (span, entry boundary, exit boundary) in chain_span / chain_from
   / chain_to (room for n) and its cost in *total. Spans with first >= last take no part; first, last and the hops'
   spans are within range, m and h below 2^31; `work` has workspace(n, m, h, updates) slots, where `updates`
   is at least the number of (span, boundary) pairs (the sum of last - first over spans that take part). Returns the
   number of links, 0 when no chain exists. */
static int64_t search(int64_t n, const double *x, int64_t m, const int64_t *first, const int64_t *last,
                     const double *fixed, const double *per_block, int64_t h, const int64_t *source,
                     const int64_t *target, const double *saving, int64_t updates, int64_t *work,
                     int64_t *chain_span, int64_t *chain_from, int64_t *chain_to, double *total) {
    int64_t *slot = work;
#define TAKE(type, slots) ((type *)(slot += (slots), slot - (slots)))
#define TAKE32(count) TAKE(int32_t, ((count) + 1) / 2 + 1)
    /* per span, numbered in the order of first boundaries: entry[r] the least (cost before + fixed - x[p] *
       per_block) over its entry points p so far; arrived[r] its link's cost if it ends at the current boundary
       (read by the hops taken there); offer[r] the cheapest hop into it there */
    double *entry = TAKE(double, m), *arrived = TAKE(double, m), *cost_per_block = TAKE(double, m);
    double *cost_fixed = TAKE(double, m);
    Offer *offer = TAKE(Offer, 2 * m);
    int32_t *orig = TAKE32(m), *number = TAKE32(m), *active = TAKE32(m), *ends = TAKE32(m);
    int32_t *last_update = TAKE32(m), *by_source = TAKE32(h);
    double *most_saved = TAKE(double, m);  /* the largest saving of a hop from each span */
    int64_t *start_key = TAKE(int64_t, m), *source_key = TAKE(int64_t, h), *span_off = TAKE(int64_t, n + 1);
    int64_t *hop_off = TAKE(int64_t, m + 1);
    Hop *hops = TAKE(Hop, h * (int64_t)(sizeof(Hop) / 8));  /* by source: hops[hop_off[r] .. hop_off[r + 1]) */
    int32_t *log_node = TAKE32(updates), *log_before = TAKE32(updates), *log_prev = TAKE32(updates);
#undef TAKE32
#undef TAKE
    for (int64_t k = 0; k < m; k++)
        start_key[k] = first[k] < last[k] ? first[k] : n - 1;  /* (a span that takes no part: never entered) */
    bucket(n, m, start_key, span_off, orig);
    for (int64_t r = 0; r < m; r++) {
        int64_t k = orig[r];
        number[k] = (int32_t)r, last_update[r] = -1, ends[r] = first[k] < last[k] ? (int32_t)last[k] : -1;
        entry[r] = INFINITY, arrived[r] = INFINITY, cost_per_block[r] = per_block[k], cost_fixed[r] = fixed[k];
        offer[r] = (Offer){INFINITY, INT32_MAX, -1}, most_saved[r] = -INFINITY;
    }
    /* a hop s -> t can be taken at boundary j when s's link may end there and t's may start: first[s] < j <=
       last[s] and first[t] <= j < last[t] */
    for (int64_t e = 0; e < h; e++) source_key[e] = number[source[e]];
    bucket(m, h, source_key, hop_off, by_source);
    for (int64_t i = 0; i < h; i++) {
        int64_t e = by_source[i], s = source[e], t = target[e];
        int64_t lo = first[s] + 1 > first[t] ? first[s] + 1 : first[t];
        int64_t hi = last[s] < last[t] - 1 ? last[s] : last[t] - 1;
        hops[i] = lo <= hi ? (Hop){number[t], (int32_t)lo, (int32_t)hi, (int32_t)e, saving[e]}
                           : (Hop){0, 1, 0, (int32_t)e, saving[e]};  /* (never taken) */
        if (lo <= hi && saving[e] > most_saved[number[s]]) most_saved[number[s]] = saving[e];
    }
    int64_t spans = 0, logged = 0;  /* active[0 .. spans): the spans covering the boundary before */
    double final_cost = INFINITY;
    int64_t final_span = -1;
    for (int64_t j = 0; j < n; j++) {
        /* the spans that may leave at j (those covering j - 1): their links' costs; the cheapest way into j */
        double base = 0.0, xj = x[j];
        int64_t best = -1, nan = 0;
        for (int64_t i = 0; i < spans; i++) {
            int32_t r = active[i];
            double cost = entry[r] + xj * cost_per_block[r];
            arrived[r] = cost;
            nan |= isnan(cost);
            if (cost < base || best < 0 || (cost == base && orig[r] < orig[best])) base = cost, best = r;
        }
        int64_t reached = j == 0 || (!nan && best >= 0 && isfinite(base));
        if (j > 0 && reached && j == n - 1) final_cost = base, final_span = best;
        int64_t enter = reached && j < n - 1;
        /* the cheapest hop into each span at j, the least index of equals. A hop counts only where it is cheaper
           than the plain way in (base, the least of the arrivals): only sources that arrived within their largest
           saving of it are looked at (subtraction is monotonic, so none of the others' hops could be). */
        for (int64_t i = 0; enter && i < spans; i++) {
            int32_t r = active[i];
            if (!(arrived[r] - most_saved[r] < base)) continue;
            for (int64_t at = hop_off[r]; at < hop_off[r + 1]; at++) {
                const Hop *e = hops + at;
                if (e->low > j || e->high < j) continue;
                Offer *o = offer + e->target;
                double offered = arrived[r] - e->saving;
                if (offered < o->cost || (offered == o->cost && e->index < o->index))
                    o->cost = offered, o->index = e->index, o->span = r;
            }
        }
        /* the spans covering j: those still covering it, and those that start there */
        int64_t kept = 0;
        for (int64_t i = 0; i < spans; i++) {
            active[kept] = active[i];
            kept += ends[active[i]] > j;
        }
        for (int64_t r = span_off[j]; r < span_off[j + 1]; r++) {
            active[kept] = (int32_t)r;
            kept += ends[r] >= 0;
        }
        spans = kept;
        if (!enter) continue;
        int32_t base_span = j == 0 ? -1 : (int32_t)best;
        for (int64_t i = 0; i < spans; i++) {  /* a hop replaces the plain way in when strictly cheaper */
            int32_t r = active[i];
            Offer *o = offer + r;
            double way = base;
            int32_t before = base_span;
            if (o->cost < base) way = o->cost, before = o->span;
            *o = (Offer){INFINITY, INT32_MAX, -1};
            double value = way + cost_fixed[r] - xj * cost_per_block[r];
            if (value < entry[r]) {
                entry[r] = value;
                log_node[logged] = (int32_t)j, log_before[logged] = before, log_prev[logged] = last_update[r];
                last_update[r] = (int32_t)logged++;
            }
        }
    }
    if (final_span < 0) return 0;
    *total = final_cost;
    /* back from the end: a span leaving at j entered where its latest entry before j was made */
    int64_t links = 0, j = n - 1, r = final_span;
    while (r >= 0 && links < n) {
        int64_t u = last_update[r];
        while (u >= 0 && log_node[u] >= j) u = log_prev[u];
        if (u < 0) return 0;  /* (cannot happen: a span with a finite cost was entered) */
        chain_span[links] = orig[r], chain_from[links] = log_node[u], chain_to[links] = j;
        links++;
        j = log_node[u], r = log_before[u];
    }
    for (int64_t a = 0, b = links - 1; a < b; a++, b--) {
        int64_t t = chain_span[a];
        chain_span[a] = chain_span[b], chain_span[b] = t;
        t = chain_from[a], chain_from[a] = chain_from[b], chain_from[b] = t;
        t = chain_to[a], chain_to[a] = chain_to[b], chain_to[b] = t;
    }
    return links;
}

/* The spans in order of (first, last), those that take no part (first >= last) last: grouped[0 .. m), by last and
   then stably by first (scratch: m entries; key: m; offsets: n + 1) */
static void by_blocks(int64_t n, int64_t m, const int64_t *first, const int64_t *last, int64_t *key,
                      int64_t *offsets, int32_t *scratch, int32_t *grouped) {
    for (int64_t k = 0; k < m; k++) key[k] = first[k] < last[k] ? last[k] : n - 1;
    bucket(n, m, key, offsets, scratch);
    for (int64_t i = 0; i < m; i++) key[i] = first[scratch[i]] < last[scratch[i]] ? first[scratch[i]] : n - 1;
    bucket(n, m, key, offsets, grouped);
    for (int64_t i = 0; i < m; i++) grouped[i] = scratch[grouped[i]];
}

/* How many spans from grouped[i] on are over the same boundaries */
static int64_t same_blocks(int64_t m, int64_t i, const int32_t *grouped, const int64_t *first, const int64_t *last) {
    int64_t size = 1, k = grouped[i];
    while (i + size < m && first[grouped[i + size]] == first[k] && last[grouped[i + size]] == last[k]) size++;
    return size;
}

typedef struct {  /* a span among those over the same boundaries, for the dominance passes */
    double fixed, per_block;
    double other;  /* leave_out_dominated: its fixed cost less its largest savings; route_bound: its free KV */
    int64_t span;
} Rival;

static int by_per_block(const void *a, const void *b) {
    double x = ((const Rival *)a)->per_block, y = ((const Rival *)b)->per_block;
    return (x > y) - (x < y);
}

/* The group of spans over the same boundaries as grouped[i] (by_blocks' order): its size in *size, and its members
   sorted by `compare` in group[] when it takes part and has two or more (returns how many: 0 otherwise) */
static int64_t rivals(int64_t m, int64_t i, const int32_t *grouped, const int64_t *first, const int64_t *last,
                      const double *fixed, const double *per_block, const double *other,
                      int (*compare)(const void *, const void *), Rival *group, int64_t *size) {
    int64_t k = grouped[i];
    *size = same_blocks(m, i, grouped, first, last);
    if (first[k] >= last[k] || *size < 2) return 0;
    for (int64_t g = 0; g < *size; g++) {
        int64_t o = grouped[i + g];
        group[g] = (Rival){fixed[o], per_block[o], other[o], o};
    }
    qsort(group, (size_t)*size, sizeof(Rival), compare);
    return *size;
}

/* Leaves out (first = 1, last = 0) every span that another over the same boundaries beats whatever it saves: the
   other's fixed cost below its fixed cost less the largest savings of hops into and out of it (by a margin far above
   the rounding of any sum the walk computes: 1e-9 of a bound on their magnitudes, n links of the largest fixed cost
   and saving and twice the largest x * per_block) and the other's per-block cost at most its own. A link of such a span then always arrives later
   than the other's would at the same boundary with the same chain before, by more than any hop from it saves, so it
   is never the cheapest way into a boundary, never offers the cheapest hop that counts, and never ends the chain: the
   walk without it makes every choice it makes with it. (Of two spans, the one left out is never the other's
   dominator, so leaving out all at once is the same as one at a time.) Returns how many. */
static int64_t leave_out_dominated(int64_t n, const double *x, int64_t m, int64_t *first, int64_t *last,
                                   const double *fixed, const double *per_block, int64_t h, const int64_t *source,
                                   const int64_t *target, const double *saving, int64_t *work) {
    double *most_in = (double *)work, *most_out = most_in + m;
    int64_t *key = (int64_t *)(most_out + m), *offsets = key + m;
    int32_t *by_last = (int32_t *)(offsets + n + 1), *order = by_last + m;
    Rival *group = (Rival *)(order + m);  /* (2m int32 from an 8-byte boundary: aligned) */
    double largest_fixed = 0.0, largest_per_block = 0.0, largest_saving = 0.0;
    for (int64_t k = 0; k < m; k++) {
        most_in[k] = 0.0, most_out[k] = 0.0;
        if (fabs(fixed[k]) > largest_fixed) largest_fixed = fabs(fixed[k]);
        if (fabs(per_block[k]) > largest_per_block) largest_per_block = fabs(per_block[k]);
    }
    for (int64_t e = 0; e < h; e++) {
        int64_t s = source[e], t = target[e];
        if (saving[e] > most_out[s]) most_out[s] = saving[e];
        if (saving[e] > most_in[t]) most_in[t] = saving[e];
        if (fabs(saving[e]) > largest_saving) largest_saving = fabs(saving[e]);
    }
    double largest_x = fabs(x[0]) > fabs(x[n - 1]) ? fabs(x[0]) : fabs(x[n - 1]);
    double margin = 1e-9 * (1.0 + (double)n * (largest_fixed + largest_saving) + 2.0 * largest_x * largest_per_block);
    double *least = most_in;  /* (each span's fixed cost less its largest savings, in place) */
    for (int64_t k = 0; k < m; k++) least[k] = fixed[k] - most_in[k] - most_out[k];
    by_blocks(n, m, first, last, key, offsets, by_last, order);
    int64_t dropped = 0;
    for (int64_t i = 0, size; i < m; i += size) {
        if (rivals(m, i, order, first, last, fixed, per_block, least, by_per_block, group, &size)) {
            double cheapest = INFINITY;  /* the least fixed cost over the group's spans of per-block cost <= this run's */
            for (int64_t g = 0; g < size;) {
                int64_t run = 1;
                while (g + run < size && group[g + run].per_block == group[g].per_block) run++;
                for (int64_t r = g; r < g + run; r++)
                    if (group[r].fixed < cheapest) cheapest = group[r].fixed;
                for (int64_t r = g; r < g + run; r++) {
                    double least = group[r].other;
                    if (cheapest + margin < least)
                        first[group[r].span] = 1, last[group[r].span] = 0, dropped++;
                }
                g += run;
            }
        }
    }
    return dropped;
}

/* Workspace (8-byte slots) that route_pushed needs for a search over `blocks` blocks, m spans, h hops and `updates`
   (span, block) pairs inside the searched blocks */
int64_t route_workspace(int64_t blocks, int64_t m, int64_t h, int64_t updates) {
    return workspace(blocks + 1, m, h, updates) + 2 * m + 2 * (blocks + 2) + 16
        + (3 * m + blocks + 2 + m + 1 + 4 * m + 8);  /* (the latter: leave_out_dominated's, in the same slots) */
}

/* The best chain over blocks [start, end) of spans over blocks [starts[k], ends[k]) (`search` over the boundaries
   where some span starts or ends, as swarm.client.routing `_hop_links` lists them): its links (span, first block,
   end block) in chain_span / chain_from / chain_to (room for end - start) and its cost in *total; the number of
   links, 0 when no chain exists. Every start and end is within [0, 2^31), start < end; `updates` at least the sum
   over spans of their blocks inside [start, end); `work` of route_workspace(end - start, m, h, updates) slots. */
int64_t route_pushed(int64_t start, int64_t end, int64_t m, const int64_t *starts, const int64_t *ends,
                     const double *fixed, const double *per_block, int64_t h, const int64_t *source,
                     const int64_t *target, const double *saving, int64_t updates, int64_t *work,
                     int64_t *chain_span, int64_t *chain_from, int64_t *chain_to, double *total) {
    int64_t blocks = end - start;
    int64_t *first = work, *last = work + m, *node_of = work + 2 * m;
    double *x = (double *)(node_of + blocks + 2);
    int64_t n = boundaries(start, end, m, starts, ends, node_of, x, first, last);
    int64_t *rest = (int64_t *)(x + blocks + 1);
    leave_out_dominated(n, x, m, first, last, fixed, per_block, h, source, target, saving, rest);
    int64_t links = search(n, x, m, first, last, fixed, per_block, h, source, target, saving, updates, rest,
                           chain_span, chain_from, chain_to, total);
    for (int64_t i = 0; i < links; i++) chain_from[i] = (int64_t)x[chain_from[i]], chain_to[i] = (int64_t)x[chain_to[i]];
    return links;
}

static int cheapest_first(const void *a, const void *b) {
    const Rival *x = a, *y = b;
    if (x->fixed != y->fixed) return x->fixed < y->fixed ? -1 : 1;
    if (x->per_block != y->per_block) return x->per_block < y->per_block ? -1 : 1;
    if (x->other != y->other) return x->other > y->other ? -1 : 1;  /* (most free KV first) */
    return (x->span > y->span) - (x->span < y->span);
}

/* Workspace (8-byte slots) that route_bound needs for a search over `blocks` blocks and m spans */
int64_t route_bound_workspace(int64_t blocks, int64_t m) {
    return 14 * m + 6 * (blocks + 2) + 32;
}

/* The relayed search's pruning pass (swarm/client/routing.py `_bound`, its plain form: no limit, no savings) over
   spans over blocks [starts[k], ends[k]) costing fixed[k] + blocks x per_block[k] a link, with free[k] KV tokens:
   through[k], the cost of the cheapest chain over [start, end) through span k (INFINITY: it takes no part, is
   dominated, or is on no chain), and *best, the cheapest chain's cost (INFINITY: none). As the numpy version, with
   the same float64 operations: of spans over the same blocks, only those that no other is at least as cheap as in
   both costs (of equals, the one with the most free KV, then the first); least costs from every boundary to the end
   (backward), then each span's cheapest chain through it (forward). Every start and end within [0, 2^31), start <
   end; `work` of route_bound_workspace(end - start, m) slots. */
void route_bound(int64_t start, int64_t end, int64_t m, const int64_t *starts, const int64_t *ends,
                 const double *fixed, const double *per_block, const double *free, int64_t *work, double *through,
                 double *best) {
    int64_t blocks = end - start;
    int64_t *first = work, *last = first + m, *node_of = last + m, *key = node_of + blocks + 2;
    int64_t *offsets = key + m;
    double *x = (double *)(offsets + blocks + 2), *to_end = x + blocks + 2, *from_start = to_end + blocks + 2;
    double *exit_cost = from_start + blocks + 2, *entry = exit_cost + m;
    int32_t *order = (int32_t *)(entry + m), *by_key = order + m, *active = by_key + m;
    Rival *group = (Rival *)(active + m + (m & 1) + 2);
    int64_t n = boundaries(start, end, m, starts, ends, node_of, x, first, last);
    for (int64_t k = 0; k < m; k++) through[k] = INFINITY, exit_cost[k] = INFINITY, entry[k] = INFINITY;
    /* of spans over the same boundaries (in order of (first, last): by last, then stably by first), those that an
       earlier one in order of (fixed, per-block, most free KV, index) is at least as cheap as per block go */
    by_blocks(n, m, first, last, key, offsets, by_key, order);
    for (int64_t i = 0, size; i < m; i += size) {
        if (rivals(m, i, order, first, last, fixed, per_block, free, cheapest_first, group, &size)) {
            double least = group[0].per_block;
            for (int64_t g = 1; g < size; g++) {
                if (group[g].per_block < least) least = group[g].per_block;
                else first[group[g].span] = 1, last[group[g].span] = 0;
            }
        }
    }
    /* spans by first and by last boundary */
    for (int64_t k = 0; k < m; k++) key[k] = first[k] < last[k] ? last[k] : 0;
    bucket(n, m, key, offsets, by_key);  /* (by last: offsets of n + 1; spans that take no part at 0, skipped) */
    /* backward: to_end[j], the least cost from j to the end; exit_cost[k], the least x_q per_block + to_end[q] over
       the boundaries q > j within k seen so far. active: the spans covering j (first <= j < last), walking down */
    int64_t spans = 0;
    for (int64_t j = 0; j < n; j++) to_end[j] = INFINITY, from_start[j] = INFINITY;
    to_end[n - 1] = 0.0;
    for (int64_t j = n - 1; j >= 0; j--) {
        int64_t kept = 0;  /* those covering j: still covering it, and those that end at j + 1 */
        for (int64_t i = 0; i < spans; i++) {
            active[kept] = active[i];
            kept += first[active[i]] <= j;
        }
        if (j + 1 < n)
            for (int64_t i = offsets[j + 1]; i < offsets[j + 2]; i++) {
                int32_t k = by_key[i];
                active[kept] = k;
                kept += first[k] < last[k] && first[k] <= j;
            }
        spans = kept;
        if (j < n - 1 && spans > 0) {
            double least = INFINITY;
            for (int64_t i = 0; i < spans; i++) {
                int32_t k = active[i];
                double cost = fixed[k] + exit_cost[k] - x[j] * per_block[k];
                if (cost < least) least = cost;
            }
            to_end[j] = least;
        }
        if (j > 0 && isfinite(to_end[j]))  /* the spans that may leave at j: those covering j - 1 */
            for (int64_t i = 0; i < spans; i++) {
                int32_t k = active[i];
                if (first[k] <= j - 1) {
                    double cost = x[j] * per_block[k] + to_end[j];
                    if (cost < exit_cost[k]) exit_cost[k] = cost;
                }
            }
        /* (spans ending at j cover j - 1 and are added at the next step down) */
        if (j > 0)
            for (int64_t i = offsets[j]; i < offsets[j + 1]; i++) {
                int32_t k = by_key[i];
                if (first[k] < last[k] && isfinite(to_end[j])) {
                    double cost = x[j] * per_block[k] + to_end[j];
                    if (cost < exit_cost[k]) exit_cost[k] = cost;
                }
            }
    }
    *best = to_end[0];
    if (!isfinite(to_end[0])) return;
    /* forward: entry[k], the least from_start[p] + fixed - x_p per_block over the boundaries p within k so far; a
       span leaving at j costs entry + x_j per_block, and its cheapest chain through it that plus to_end[j] */
    for (int64_t k = 0; k < m; k++) key[k] = first[k] < last[k] ? first[k] : n - 1;
    bucket(n, m, key, offsets, by_key);
    spans = 0;
    from_start[0] = 0.0;
    for (int64_t j = 0; j < n; j++) {
        if (j > 0 && spans > 0) {  /* active: the spans covering j - 1 */
            double least = INFINITY;
            for (int64_t i = 0; i < spans; i++) {
                int32_t k = active[i];
                double reach = x[j] * per_block[k] + entry[k];
                if (reach < least) least = reach;
                double total = reach + to_end[j];
                if (total < through[k]) through[k] = total;
            }
            from_start[j] = least;
        }
        int64_t kept = 0;
        for (int64_t i = 0; i < spans; i++) {
            active[kept] = active[i];
            kept += last[active[i]] > j;
        }
        for (int64_t i = offsets[j]; i < offsets[j + 1]; i++) {
            active[kept] = by_key[i];
            kept += first[by_key[i]] < last[by_key[i]];
        }
        spans = kept;
        if (j < n - 1 && isfinite(from_start[j]))
            for (int64_t i = 0; i < spans; i++) {
                int32_t k = active[i];
                double value = from_start[j] + fixed[k] - x[j] * per_block[k];
                if (value < entry[k]) entry[k] = value;
            }
    }
}
