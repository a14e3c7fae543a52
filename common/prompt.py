"""Prompts for the rating task: a user's short-term-memory profile, and the movie to rate.

A prompt is split into a per-user *prefix* (instruction + profile, in the system turn) and a per-item
*suffix* (one user turn naming the movie, then the assistant cue). All of a user's items share the prefix,
so its keys/values are computed once (see `common.scoring`), and several items can follow one prefix in a
packed training sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from transformers import PreTrainedTokenizerBase

from common.config import PromptConfig

_SENTINEL = "\x00MOVIE\x00"


def title_year(item: pd.Series) -> str:
    """'Toy Story (1995)'."""
    return f"{item['title']} ({int(item['year'])})" if pd.notna(item["year"]) else str(item["title"])


def movie_text(item: pd.Series) -> str:
    """'Toy Story (1995) [Animation, Children's, Comedy]'."""
    return f"{title_year(item)} [{', '.join(item['genres']) or 'unknown genre'}]"


def rated_titles(rated: pd.DataFrame, items: pd.DataFrame) -> str:
    """'Alien (1979): 5/5; Heat (1995): 3/5' for rows with columns item, rating."""
    return "; ".join(f"{title_year(items.loc[i])}: {int(r)}/5" for i, r in zip(rated["item"], rated["rating"]))


def user_profile(train: pd.DataFrame, items: pd.DataFrame, cfg: PromptConfig = PromptConfig()) -> str:
    """Compact text profile from one user's training ratings (columns item, rating, ts)."""
    if train.empty:
        return "This user has not rated any movie yet."
    mean = train["rating"].mean()
    lines = [f"The user rated {len(train)} movies, {mean:.1f} out of 5 on average."]
    per_genre = (
        train.assign(genre=items.loc[train["item"], "genres"].to_numpy())
        .explode("genre").dropna(subset=["genre"])
        .groupby("genre")["rating"].agg(["mean", "size"])
    )
    per_genre = per_genre[per_genre["size"] >= cfg.min_genre_count]
    if not per_genre.empty:
        # Relative to the user's own mean: a harsh rater's 3.5 in Drama is still a favourite.
        ranked = (per_genre["mean"] - mean).sort_values(kind="stable")
        liked = [g for g, d in ranked[::-1].items() if d > 0][: cfg.top_genres]
        disliked = [g for g, d in ranked.items() if d < 0][: cfg.top_genres]
        if liked:
            lines.append("Favourite genres: " + ", ".join(liked) + ".")
        if disliked:
            lines.append("Disliked genres: " + ", ".join(disliked) + ".")
    recent = train.sort_values(["ts", "item"], kind="stable").tail(cfg.recent_items)[::-1]
    if len(recent):
        lines.append("Recently rated: " + rated_titles(recent, items) + ".")
    return "\n".join(lines)


@dataclass
class PromptBuilder:
    """Turns profiles and movies into token ids for a given tokenizer."""

    tokenizer: PreTrainedTokenizerBase
    cfg: PromptConfig = PromptConfig()

    def __post_init__(self) -> None:
        self._chat = self.cfg.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        if self._chat:
            head = self._render([{"role": "system", "content": "P"}], generation=False)
            full = self._render([{"role": "system", "content": "P"}, {"role": "user", "content": _SENTINEL}])
            if not full.startswith(head):
                self._chat = False  # a template that rewrites earlier turns cannot be cached as a prefix
            else:
                before, after = full[len(head):].split(_SENTINEL)
                self._suffix_format = before + "\x02Movie: \x01" + after
        if not self._chat:
            self._suffix_format = "\x02Movie: \x01\nRating:"

    def _render(self, messages: list[dict], generation: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def prefix_text(self, profile: str) -> str:
        system = f"{self.cfg.instruction}\n\n{profile}"
        if self._chat:
            return self._render([{"role": "system", "content": system}], generation=False)
        return system + "\n\n"

    def suffix_text(self, movie: str, memory: str = "") -> str:
        """The movie's user turn; `memory` (long-term memory recalled for this movie) goes before it."""
        return self._suffix_format.replace("\x02", memory + "\n" if memory else "").replace("\x01", movie)

    def prefix_ids(self, profile: str) -> list[int]:
        return self._encode(self.prefix_text(profile))

    def suffix_ids(self, movie: str, memory: str = "") -> list[int]:
        return self._encode(self.suffix_text(movie, memory))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def item_stats(train: pd.DataFrame) -> pd.DataFrame:
    """Per-movie mean rating and count over training ratings (index item; columns mean, count): the collaborative
    signal user+item bias models live on. In a federation this is a release like any other (a sum over devices)."""
    return train.groupby("item")["rating"].agg(["mean", "count"])


def item_stats_text(item: int, stats: pd.DataFrame) -> str:
    """'Other users rated it 3.9/5 on average (212 ratings).' for one movie (or that nobody has yet)."""
    if item not in stats.index or stats.at[item, "count"] < 1:
        return "No other user has rated it yet."
    n = int(stats.at[item, "count"])
    return f"Other users rated it {stats.at[item, 'mean']:.1f}/5 on average ({n} rating{'s' if n != 1 else ''})."
