"""Synthetic clinical covariates (``generate --covariates``): what a scan does not show, and its effect on the response.

Each subject's covariates come from a stream of its own (seed, subject index, a tag), drawn apart from its
imaging draws, so the severities, sites and nuisance draws are those of the cohort without covariates; the
images differ by the age's atrophy alone. Columns of ``labels.csv``:

- ``age`` (years, 18-80, uniform): ageing atrophies the brain as the disease does (below);
- ``sex`` (``F`` / ``M``): no effect (a distractor a model should ignore);
- ``baseline_score``: a symptom scale, ``10 + 0.3 x severity + N(0, 8)``, rounded to 0.1 and missing for
  5% of subjects: it tells a little about severity, far less than the scan;
- ``genotype``: a pharmacogenetic metaboliser status, ``poor`` / ``intermediate`` / ``normal`` /
  ``ultrarapid`` (10 / 25 / 50 / 15%), missing (not genotyped) for 5%;
- ``prior_treatments``: how many treatments failed before (Poisson, mean 1.2).

**Effect on the scan: age-related atrophy.** A subject ``age`` years old is rendered with the anatomy of a
severity ``AGE_ATROPHY_PER_YEAR x (age - 18)`` points higher than its own (``CohortConfig.age_atrophy_per_year``,
0.2 by default: up to 12.4 points at 80): smaller hippocampi, thinner prefrontal cortex, both darker, exactly as
the disease changes them, so that the scan alone cannot tell ageing from disease; the ``age`` column can. The
``severity`` label stays the disease's. Age is drawn independently of the severity, so the covariates alone
still tell nothing of it (normal ageing shrinks the hippocampus by about 0.2-0.5% a year in mid-life; 0.2 points
a year is 0.1% of hippocampal volume, a mild ageing).

**Effect on the response**: the imaging draw gives each subject a *biological* class,
which the scan shows (the caudate signature) and which sets the severity range. The *observed*
``response`` is one class lower (not below non-responder) for an ``ultrarapid`` metaboliser (the drug
is cleared before it acts) and one more class lower after three or more ``prior_treatments``
(treatment resistance). About one subject in seven is moved (15% of 300 at seed 42), so imaging alone cannot classify every
subject; covariates alone cannot either (they do not show the biological class), nor estimate the
severity within a class. The drawn rule and the share moved are recorded in ``cohort.json``.
"""

from __future__ import annotations

import numpy as np

from monai_mtl import RESPONSE_NAMES

#: covariate columns ``generate --covariates`` adds to ``labels.csv``
COVARIATE_COLUMNS = ("age", "sex", "baseline_score", "genotype", "prior_treatments")
GENOTYPES = ("poor", "intermediate", "normal", "ultrarapid")
GENOTYPE_PROPORTIONS = (0.10, 0.25, 0.50, 0.15)
MISSING_SHARE = 0.05
RESISTANT_AFTER = 3  # prior treatments from which the response drops one class
MIN_AGE, MAX_AGE = 18, 80
#: severity points of atrophy a year of age above ``MIN_AGE`` adds to the scan (``generate --covariates``)
AGE_ATROPHY_PER_YEAR = 0.2

# covariates are drawn from streams of their own (tagged), so adding them never changes a subject's other draws
_COVARIATE_STREAM = 0xC0F4


def observed_response(biological: int, genotype: str | None, prior_treatments: int) -> int:
    """The response a subject shows: its biological class, lowered by an ultrarapid genotype and by resistance."""
    drop = int(genotype == "ultrarapid") + int(prior_treatments >= RESISTANT_AFTER)
    return max(int(biological) - drop, 0)


def most_likely_response(biological: int, genotype: str | None, prior_treatments: int,
                         genotype_shares: dict[str, float] | None = None) -> int:
    """The response an observer who knows the biological class, the covariates and the rule names.

    Where the genotype is missing (not genotyped) the observer names the class that the most genotypes,
    weighted by their shares in the population (``cohort.json``), give: no model can do better on
    average, so these subjects set the response's information limit (:mod:`monai_mtl.floor`).
    """
    if genotype is not None:
        return observed_response(biological, genotype, prior_treatments)
    shares = genotype_shares if genotype_shares is not None else dict(zip(GENOTYPES, GENOTYPE_PROPORTIONS))
    votes: dict[int, float] = {}
    for candidate, share in shares.items():
        response = observed_response(biological, candidate, prior_treatments)
        votes[response] = votes.get(response, 0.0) + float(share)
    return max(sorted(votes), key=votes.__getitem__)


def _covariate_stream(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, _COVARIATE_STREAM]))


def _draw_age(rng: np.random.Generator) -> int:
    return int(rng.integers(MIN_AGE, MAX_AGE + 1))


def subject_age(seed: int, index: int) -> int:
    """Subject ``index``'s ``age``, as :func:`draw_covariates` draws it (the first draw of its covariate stream).

    The generator renders the age's atrophy from it before the other covariates, which depend on the severity.
    """
    return _draw_age(_covariate_stream(seed, index))


def age_atrophy(age: float, per_year: float) -> float:
    """The severity points of atrophy ``age`` adds to the scan at ``per_year`` points a year above ``MIN_AGE``."""
    return float(per_year) * max(float(age) - MIN_AGE, 0.0)


def draw_covariates(seed: int, index: int, severity: float) -> tuple[dict, str]:
    """Subject ``index``'s covariates (``None`` where missing) and its true genotype, from its own stream.

    ``severity`` on 0-100. The true genotype drives the response even where the column is missing:
    not being genotyped does not change the biology.
    """
    rng = _covariate_stream(seed, index)
    age = _draw_age(rng)
    sex = str(rng.choice(["F", "M"]))
    score = float(np.round(10.0 + 0.3 * severity + rng.normal(0.0, 8.0), 1))
    genotype = str(rng.choice(GENOTYPES, p=GENOTYPE_PROPORTIONS))
    prior = int(rng.poisson(1.2))
    score_missing, genotype_missing = rng.random(2) < MISSING_SHARE
    covariates = {"age": age, "sex": sex, "baseline_score": None if score_missing else score,
                  "genotype": None if genotype_missing else genotype, "prior_treatments": prior}
    return covariates, genotype


def with_covariates(row: dict, seed: int, index: int) -> dict:
    """A ``labels.csv`` row with the covariate columns added and ``response`` / ``response_name`` made the observed ones."""
    covariates, genotype = draw_covariates(seed, index, row["severity"])
    response = observed_response(row["response"], genotype, covariates["prior_treatments"])
    return {**row, "response": response, "response_name": RESPONSE_NAMES[response], **covariates}


def covariate_facts(labels, biological: list[int], age_atrophy_per_year: float = 0.0) -> dict:
    """What ``cohort.json`` records about the covariates: the columns, the rules, and how many responses moved."""
    moved = int(sum(int(a) != int(b) for a, b in zip(labels["response"], biological)))
    return {
        "columns": list(COVARIATE_COLUMNS),
        "age_rule": (f"the scan shows the anatomy of severity + {age_atrophy_per_year:g} x (age - {MIN_AGE}) "
                     "(age-related atrophy of the hippocampi and prefrontal cortex); the severity label is the disease's"),
        "genotypes": dict(zip(GENOTYPES, GENOTYPE_PROPORTIONS)),
        "missing_share": {"baseline_score": MISSING_SHARE, "genotype": MISSING_SHARE},
        "response_rule": ("observed response = biological class - 1 if genotype is ultrarapid, - 1 more if "
                          f"prior_treatments >= {RESISTANT_AFTER}, not below 0; the scan shows the biological class"),
        "baseline_score": "10 + 0.3 x severity + N(0, 8), rounded to 0.1",
        "responses_moved": moved,
        "responses_moved_share": moved / max(len(biological), 1),
    }


__all__ = ["COVARIATE_COLUMNS", "GENOTYPES", "AGE_ATROPHY_PER_YEAR", "observed_response", "most_likely_response",
           "subject_age", "age_atrophy", "draw_covariates", "with_covariates", "covariate_facts"]
