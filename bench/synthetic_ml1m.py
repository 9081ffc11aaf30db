"""A synthetic release in MovieLens 1M's layout (ratings.dat, movies.dat, users.dat; '::', ISO-8859-1), to
check cfb's settings on data they were not chosen on (docs/coldstart.md, "On data the settings never saw"):

    python bench/synthetic_ml1m.py OUT_DIR [--oracle]
    cfb eval cold-start --data OUT_DIR --seeds 42 [--items]

6,040 users, 3,700 movies, 1,000,000 ratings with 1M's shares of 1..5. Planted structure: 16 latent user
and item factors; an item's factors partly from its genres and decade (45% of their variance), a user's
partly from gender, age and occupation (30%); user and item biases; noise; who rates what from
popularity and taste (missing not at random); each user's first 15-25 ratings one session seconds apart,
leaning to popular movies, as MovieLens sign-ups do. Deterministic (its own seed). ``--oracle`` prints
the RMSE of the planted model's own expected ratings, the floor any model can reach.
"""
import sys
from pathlib import Path

import numpy as np

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit(__doc__)
OUT = Path(sys.argv[1])
SEED = 20240601
N_USERS, N_ITEMS, TARGET = 6040, 3700, 1_000_000
K = 16
RHO_GENRE = 0.45    # share of item-factor variance explained by genres/decade
RHO_DEMO = 0.30     # share of user-factor variance explained by gender/age/occupation
POP_ALPHA = 0.85    # weight of log-popularity in who-rates-what
TASTE_BETA = 0.6    # weight of (u.v + b_i) in who-rates-what (missing-not-at-random)
SD_UB, SD_IB, SD_UV, SD_NOISE = 0.40, 0.45, 0.55, 0.75
RATING_SHARES = [0.056, 0.108, 0.261, 0.349, 0.226]  # ML-1M's 1..5 shares (mean ~3.58)

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western"]
GENRE_P = np.array([503, 283, 105, 251, 1200, 211, 127, 1603, 68, 44, 343, 114, 106, 471, 276, 492, 143, 68],
                   float)  # ML-1M genre counts
AGES = [1, 18, 25, 35, 45, 50, 56]
AGE_P = np.array([222, 1103, 2096, 1193, 550, 496, 380], float)
OCC_P = np.array([711, 528, 267, 173, 759, 112, 236, 679, 17, 92, 195, 129, 388, 142, 302, 144, 241, 502, 70,
                  72, 281], float)

rng = np.random.default_rng(SEED)


def unit(x):
    return (x - x.mean(0)) / x.std(0)


# ---- items ----
n_gen = rng.choice([1, 2, 3, 4], N_ITEMS, p=[0.50, 0.33, 0.13, 0.04])
G = np.zeros((N_ITEMS, len(GENRES)))
for i, n in enumerate(n_gen):
    G[i, rng.choice(len(GENRES), n, replace=False, p=GENRE_P / GENRE_P.sum())] = 1
years = np.where(rng.random(N_ITEMS) < 0.7, rng.integers(1985, 2001, N_ITEMS), rng.integers(1919, 1985, N_ITEMS))
decade = np.clip((years - 1910) // 10, 0, 9)
D = np.eye(10)[decade]
content = np.hstack([G, 0.5 * D])
item_content = unit(content @ rng.normal(size=(content.shape[1], K)))
V = np.sqrt(RHO_GENRE) * item_content + np.sqrt(1 - RHO_GENRE) * rng.normal(size=(N_ITEMS, K))
pop_latent = rng.normal(size=N_ITEMS) + 0.3 * G[:, [0, 1, 14]].sum(1) - 0.4 * G[:, [6, 9]].sum(1) \
    + 0.04 * (years - 1985).clip(-20, 15)   # popularity (log scale); recent action/sci-fi lean popular
b_i = SD_IB * (0.45 * unit(pop_latent) + np.sqrt(1 - 0.45 ** 2) * rng.normal(size=N_ITEMS)) \
    + 0.25 * G[:, [7, 9, 6]].sum(1) - 0.25 * G[:, [10, 3]].sum(1)   # dramas/noir rate higher, horror lower

# ---- users ----
gender = np.where(rng.random(N_USERS) < 0.717, "M", "F")
age = np.array(AGES)[rng.choice(7, N_USERS, p=AGE_P / AGE_P.sum())]
occ = rng.choice(21, N_USERS, p=OCC_P / OCC_P.sum())
# (occupations correlate with age, as in the real file)
occ[(age == 1) & (rng.random(N_USERS) < 0.7)] = 10
occ[(age >= 56) & (rng.random(N_USERS) < 0.35)] = 13
occ[(occ == 10) & (age >= 25)] = 0
demo = np.hstack([(gender == "F")[:, None] * 1.5, np.eye(7)[np.searchsorted(AGES, age)], 0.7 * np.eye(21)[occ]])
user_demo = unit(demo @ rng.normal(size=(demo.shape[1], K)))
U = np.sqrt(RHO_DEMO) * user_demo + np.sqrt(1 - RHO_DEMO) * rng.normal(size=(N_USERS, K))
b_u = rng.normal(0, SD_UB, N_USERS) + 0.08 * (np.searchsorted(AGES, age) - 3)  # older users rate a bit higher

uv_scale = SD_UV / np.sqrt(K)

# ---- how many ratings per user (min 20, long tail, mean ~165) ----
extra = rng.lognormal(np.log(75), 1.15, N_USERS)
extra *= (TARGET - 20 * N_USERS) / extra.sum()
n_u = np.minimum(20 + np.round(extra).astype(int), 2300)
while n_u.sum() != TARGET:  # spread the remainder over users below the cap
    gap = TARGET - n_u.sum()
    room = np.flatnonzero(n_u < 2300) if gap > 0 else np.flatnonzero(n_u > 20)
    n_u[rng.choice(room, min(abs(gap), len(room)), replace=False)] += np.sign(gap)

# ---- who rates what: Gumbel top-k on popularity + taste ----
logpop = POP_ALPHA * 1.6 * unit(pop_latent)
users, items, raw = [], [], []
for lo in range(0, N_USERS, 500):
    hi = min(lo + 500, N_USERS)
    aff = (U[lo:hi] @ V.T) * uv_scale + b_i[None, :] * 0.5
    keys = logpop[None, :] + TASTE_BETA * aff / SD_UV + rng.gumbel(size=aff.shape)
    for r in range(hi - lo):
        u = lo + r
        top = np.argpartition(-keys[r], n_u[u])[: n_u[u]]
        users.append(np.full(len(top), u))
        items.append(top)
        raw.append(aff[r, top] - b_i[top] * 0.5 + b_i[top] + b_u[u])
users, items, raw = np.concatenate(users), np.concatenate(items), np.concatenate(raw)
signal = raw.copy()
raw = raw + rng.normal(0, SD_NOISE, len(raw))
cuts = np.quantile(raw, np.cumsum(RATING_SHARES)[:-1])
rating = 1 + np.searchsorted(cuts, raw)

# ---- timestamps: sign-up in 2000 (a few later), first ratings lean popular ----
t0 = 956_700_000  # 2000-04-25
order = np.lexsort((rng.random(len(users)), users))
ts = np.empty(len(users), np.int64)
start = t0 + (rng.beta(1.3, 2.5, N_USERS) * 250 * 86400).astype(np.int64)
late = rng.random(N_USERS) < 0.08
start[late] += (rng.random(late.sum()) * 700 * 86400).astype(np.int64)
span_days = np.clip(rng.lognormal(np.log(25), 1.3, N_USERS), 1, 600)
bounds = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=N_USERS))])
for u in range(N_USERS):
    idx = order[bounds[u]:bounds[u + 1]]
    n = len(idx)
    # earliest = highest popularity + noise
    key = unit(pop_latent[items[idx]]) if n > 1 else np.zeros(n)
    seq = idx[np.argsort(-(key + rng.normal(0, 1.0, n)))]
    first = min(n, rng.integers(15, 26))            # the sign-up session: seconds apart
    t = np.empty(n, np.int64)
    t[:first] = start[u] + np.cumsum(rng.integers(2, 40, first))
    if n > first:
        sessions = np.sort(rng.beta(0.6, 1.4, n - first)) * span_days[u] * 86400
        t[first:] = t[first - 1] + 60 + sessions.astype(np.int64) + np.arange(n - first)
    ts[seq] = t

# ---- ids and files ----
movie_ids = np.sort(rng.choice(np.arange(1, 3953), N_ITEMS, replace=False))
OUT.mkdir(parents=True, exist_ok=True)
WORDS = ["Night", "City", "Love", "River", "Last", "Dark", "Blue", "Star", "Man", "Woman", "Day", "House", "War",
         "Dream", "King", "Secret", "Road", "Heart", "Lost", "Fire", "Game", "Ghost", "Summer", "Story", "Island",
         "Café", "Señor", "Amélie", "Über", "Noël"]
lines = []
for j in range(N_ITEMS):
    w = rng.choice(WORDS, rng.integers(1, 4))
    title = " ".join(w) + f" {j + 1}"
    r = rng.random()
    if r < 0.10:
        title = f"{title}, The"
    elif r < 0.13:
        title = f"{title} (Le {w[0]} {j})"   # an alternate title in parentheses, as 1M has
    gen = "|".join(g for g, on in zip(GENRES, G[j]) if on)
    lines.append(f"{movie_ids[j]}::{title} ({years[j]})::{gen}\n")
(OUT / "movies.dat").write_text("".join(lines), encoding="latin-1")
zips = [f"{z:05d}" + (f"-{rng.integers(1000, 9999)}" if rng.random() < 0.01 else "")
        for z in rng.integers(1000, 99999, N_USERS)]
(OUT / "users.dat").write_text("".join(f"{u + 1}::{gender[u]}::{age[u]}::{occ[u]}::{zips[u]}\n"
                                       for u in range(N_USERS)), encoding="latin-1")
o = np.lexsort((ts, users))  # 1M's ratings.dat is grouped by user
with open(OUT / "ratings.dat", "w", encoding="latin-1") as f:
    f.write("".join(f"{a}::{b}::{c}::{d}\n" for a, b, c, d in
                    zip((users[o] + 1).tolist(), movie_ids[items[o]].tolist(), rating[o].tolist(), ts[o].tolist())))

# ---- summary ----
cnt = np.bincount(items, minlength=N_ITEMS)
print(f"ratings {len(rating):,}; users {N_USERS}, min/median/max per user {n_u.min()}/{int(np.median(n_u))}/{n_u.max()}")
print(f"items rated {np.count_nonzero(cnt)}; per item max {cnt.max()}, top10 {np.sort(cnt)[-10:][::-1].tolist()}, "
      f">=1000: {(cnt >= 1000).sum()}, median {int(np.median(cnt))}, <5: {(cnt < 5).sum()}")
print(f"rating mean {rating.mean():.3f}, shares {np.bincount(rating)[1:] / len(rating)}")
print("sizes MB", {p.name: round(p.stat().st_size / 1e6, 1) for p in OUT.iterdir()})
if "--oracle" in sys.argv:  # the planted model's own expected rating: the RMSE floor
    from scipy.stats import norm
    er = 1 + sum(norm.sf((c - signal) / SD_NOISE) for c in cuts)
    print(f"oracle RMSE {np.sqrt(np.mean((rating - er) ** 2)):.4f}; global-mean RMSE {rating.std():.4f}")
