"""Where `ramp.RampPlan`'s free chunks (from the prompt's start) meet its tight ones (from its
end): the r tokens between them (a multiple of the alignment, fewer than the next free chunk)
go where they cost least, each way priced in closed form over the few runs it touches:

* ``own``: a chunk of r tokens (r >= floor);
* ``grow front``: one alignment unit more on each of the last r/align free chunks (free sizes
  are a minimum of the summed time, so this costs second order);
* ``grow start``: one unit more on each of the first r/align free chunks (several each when
  there are fewer; where chunks are cheapest and far from the largest step: best when the free
  sizes sit at the floor), every later free chunk r tokens further on (closed form:
  r*(beta*tokens + delta*chunks) more);
* ``shrink front``: the next free chunk, and one unit less on each of enough free chunks
  before it;
* ``grow back``: one unit more on each of the first r/align tight chunks (no free ones);
* ``shrink back``: a floor chunk, and one unit less on each of enough tight chunks after it;
* ``last``: the plan's last chunk takes them (every tight chunk r tokens earlier), or a floor
  chunk goes in and the last chunk gives what r lacks (every tight chunk later), only where
  that chunk is below the floor or nothing else fits the limits (no plan of this shape if
  neither fits).

A key is (i, j, mid, back): free runs 0..i-1 whole and j chunks of run i, then the runs
``mid`` (changed free chunks, an inserted chunk), then the tight runs ``back``.
"""

from __future__ import annotations

import math

Runs = list  # [(chunk_tokens, count), ...] in plan order


def best_junction(rp, i: int, j: int, back: Runs, x_t: int, sums: list,
                  lasts: list) -> tuple[float, tuple]:
    """(objective, key) of the cheapest way to join the free prefix (i, j) of ``rp`` (a
    `RampPlan`) to the tight runs ``back`` starting at x_t, whose runs take ``sums`` in all
    and ``lasts`` at their last chunk (seconds; see the module); its largest step goes to
    ``rp.top``."""
    al, floor, cap, p1 = rp.align, rp.floor, rp.cap, rp.p1
    tot_f, mx_f, x_f = rp.front_terms(i, j)
    tot_b = sum(sums)  # per run of the tight ones, the largest step from it on:
    suffix_mx = lasts[:]
    for k in range(len(suffix_mx) - 2, -1, -1):
        if suffix_mx[k + 1] > suffix_mx[k]:
            suffix_mx[k] = suffix_mx[k + 1]
    mx_b = suffix_mx[0] if suffix_mx else 0.0
    r = x_t - x_f
    if r == 0:
        rp.top = max(mx_f, mx_b)
        return tot_f + tot_b + p1 * rp.top, (i, j, [], back)
    best_f, best_key = math.inf, None

    def consider(work: float, top: float, key: tuple) -> None:
        """A way with summed time ``work`` and largest step ``top`` (seconds)."""
        nonlocal best_f, best_key
        f = work + p1 * top
        if f < best_f:
            best_f, best_key = f, key
            rp.top = top

    u = r // al
    if r >= floor:  # own
        s, last = rp.run_times(r, x_f, 1)
        consider(tot_f + s + tot_b, max(mx_f, last, mx_b), (i, j, [(r, 1)], back))
    nf = len(rp.fc)
    if nf:
        c_next = rp.fc[i] if i < nf else cap
        for grow, units, extra in ((True, u, []), (False, (c_next - r) // al, [(c_next, 1)])):
            cut = _front_tail(rp, i, j, units)
            if cut is None:
                continue
            i2, j2, tail = cut
            step = al if grow else -al
            if not (floor <= tail[0][0] + step and tail[-1][0] + step <= cap):
                continue  # (free sizes grow along the prompt: check the ends)
            t0, m0, x0 = rp.front_terms(i2, j2)
            # The tail's chunks one unit larger (smaller), the k-th from its start starting
            # (k-1) units later (earlier). On a segment [x0, x1] of K chunks, sum t = kappa*
            # sum c^2 + beta*(x1^2 - x0^2)/2 + gamma*(x1 - x0) + delta*sum h + K*c0, so its
            # time changes by kappa*(2*step*T + units*al^2) (T: its tokens) + beta*(x_end^2 -
            # x_f^2)/2 + gamma*units*step + delta*step*units*(units-1)/2; then the inserted
            # chunk, if any.
            x_end = x_f + units * step
            d_s = (rp.kap * (2 * step * (x_f - x0) + units * al * al)
                   + 0.5 * rp.b * (x_end - x_f) * (x_end + x_f) + rp.g * units * step
                   + rp.d * step * (units * (units - 1) // 2))
            c_end = tail[-1][0] + step
            mx = rp.t(c_end, x_end - c_end)
            if extra:
                s, last = rp.run_times(c_next, x_end, 1)
                d_s += s
                mx = max(mx, last)
            mid = [(c + step, n) for c, n in tail] + extra
            consider(tot_f + d_s + tot_b, max(m0, mx, mx_b), (i2, j2, mid, back))
        k_pref = rp.fk[i] + j if i < nf else 0
        k = min(u, k_pref)
        grow_start = _start_head(rp, i, j, k) if k else None
        q, extra = divmod(u, k) if k else (0, 0)
        if (grow_start is not None
                and max(c for c, _ in grow_start[2]) + (q + (extra > 0)) * al <= cap):
            i2, j2, head = grow_start  # the head ends where free prefix (i2, j2) ends
            t0, m0, x0 = rp.front_terms(i2, j2)
            mid = _add_units(head, q, extra, al)
            s, mx, x1 = rp.price_runs(mid, rp.h0)
            k_rest = k_pref - k
            tot_rest = tot_f - t0 + r * (rp.b * (x_f - x0) + rp.d * k_rest)
            mx_rest = mx_f + ((rp.b * _last_c(rp, i, j) + rp.d) * r if k_rest else 0.0)
            consider(s + tot_rest + tot_b, max(mx, mx_rest, mx_b), (-1, mid, (i, j), back))
    body = len(back) - 1  # the last run is the plan's last chunk: not changed
    for grow, units, lead in ((True, u, []), (False, (floor - r) // al, [(floor, 1)])):
        if not grow and r >= floor:
            continue
        cut = _head(back, body, units)
        if cut is None:
            continue
        k, head = cut  # head: the first `units` chunks, from runs 0..k (run k in part)
        step = al if grow else -al
        if any(not floor <= c + step <= cap for c, _ in head):
            continue
        new_head = lead + [(c + step, n) for c, n in head]
        c_k, taken = back[k][0], head[-1][1]
        n_k = back[k][1] - taken  # chunks of run k after the head
        # The head's old cost: runs 0..k-1 whole and the first `taken` chunks of run k.
        h_k = x_t + sum(c * n for c, n in back[:k])
        old = sum(sums[:k]) + rp.run_times(c_k, h_k, taken)[0]
        s, mx, _ = rp.price_runs(new_head, x_f)
        rest = ([(c_k, n_k)] if n_k else []) + back[k + 1:]
        mx_rest = suffix_mx[k] if n_k else suffix_mx[k + 1]
        consider(tot_f + s + tot_b - old, max(mx_f, mx, mx_rest),
                 (i, j, new_head, rest))
    last = back[-1][0]
    if best_key is None or last < floor:
        # The plan's last chunk takes the r tokens (every tight chunk r tokens earlier), or
        # gives a floor chunk at the junction what r lacks (every tight chunk that much later).
        for c_last, lead, x0 in ((last + r, [], x_f), (last - (floor - r), [(floor, 1)], x_f)):
            if not 1 <= c_last <= rp.budget or (lead and r >= floor):
                continue
            shifted = lead + back[:-1] + [(c_last, 1)]
            s, mx, _ = rp.price_runs(shifted, x0)
            consider(tot_f + s, max(mx_f, mx), (i, j, [], shifted))
    return best_f, best_key


def _start_head(rp, i: int, j: int, units: int):
    """(i2, j2, head): the first ``units`` free chunks as runs, ending where the free prefix
    (i2, j2) ends; None if the prefix (i, j) has fewer."""
    if units <= 0 or (rp.fk[i] + j if i < len(rp.fk) else 0) < units:
        return None
    head: Runs = []
    for k in range(len(rp.fc)):
        take = min(units, rp.fn[k])
        head.append((rp.fc[k], take))
        units -= take
        if units == 0:
            return (k + 1, 0, head) if take == rp.fn[k] else (k, take, head)
    return None


def _add_units(head: Runs, q: int, extra: int, al: int) -> Runs:
    """``head`` with q alignment units more on every chunk and one more on its first
    ``extra`` chunks."""
    out: Runs = []
    for c, n in head:
        take = min(extra, n)
        if take:
            out.append((c + (q + 1) * al, take))
            extra -= take
        if n > take:
            out.append((c + q * al, n - take))
    return out


def _last_c(rp, i: int, j: int) -> int:
    """The size of the last chunk of the free prefix (i, j)."""
    return rp.fc[i] if j else rp.fc[i - 1]


def _front_tail(rp, i: int, j: int, units: int):
    """(i2, j2, tail): the last ``units`` free chunks of the prefix (i, j) as runs (plan
    order) and the prefix before them; None if the prefix has fewer."""
    if units <= 0:
        return None
    tail: Runs = []
    while units > 0:
        if j == 0:
            if i == 0:
                return None
            i -= 1
            j = rp.fn[i]
        k = min(units, j)
        tail.append((rp.fc[i], k))
        j -= k
        units -= k
    tail.reverse()
    return i, j, tail


def _head(back: Runs, body: int, units: int):
    """(k, head): the first ``units`` chunks of ``back[:body]`` as runs, the last of them in
    run k (whole or in part); None if it has fewer."""
    if units <= 0:
        return None
    head: Runs = []
    for k in range(body):
        c, n = back[k]
        take = min(units, n)
        head.append((c, take))
        units -= take
        if units == 0:
            return k, head
    return None
