import pandas as pd

from common.config import PromptConfig
from common.model import tiny_tokenizer
from common.prompt import PromptBuilder, movie_text, user_profile

ITEMS = pd.DataFrame({
    "title": ["Alien", "Heat", "Clueless", "Big", "Psycho", "Casino"],
    "year": pd.array([1979, 1995, None, 1988, 1960, 1995], dtype="Int64"),
    "genres": [("Horror", "Sci-Fi"), ("Action",), ("Comedy",), ("Comedy",), ("Horror",), ("Drama",)],
}, index=pd.Index([1, 2, 3, 4, 5, 6], name="item"))


def test_movie_text():
    assert movie_text(ITEMS.loc[1]) == "Alien (1979) [Horror, Sci-Fi]"
    assert movie_text(ITEMS.loc[3]) == "Clueless [Comedy]"


def test_profile_names_liked_and_disliked_genres_and_recent_items():
    train = pd.DataFrame({"item": [1, 5, 3, 4, 2, 6], "rating": [1.0, 2.0, 5.0, 5.0, 3.0, 4.0],
                          "ts": [1, 2, 3, 4, 5, 6]})
    text = user_profile(train, ITEMS, PromptConfig(min_genre_count=2, recent_items=2))
    assert "rated 6 movies, 3.3 out of 5" in text
    assert "Favourite genres: Comedy." in text
    assert "Disliked genres: Horror." in text
    assert "Recently rated: Casino (1995): 4/5; Heat (1995): 3/5." in text


def test_profile_for_a_user_without_history():
    assert "not rated" in user_profile(ITEMS.iloc[:0].reset_index().assign(rating=[], ts=[]), ITEMS)


def test_prefix_and_suffix_use_the_chat_template():
    tok = tiny_tokenizer()
    builder = PromptBuilder(tok)
    prefix, suffix = builder.prefix_text("PROFILE"), builder.suffix_text("Alien (1979) [Horror]")
    full = tok.apply_chat_template(
        [{"role": "system", "content": f"{PromptConfig().instruction}\n\nPROFILE"},
         {"role": "user", "content": "Movie: Alien (1979) [Horror]"}], tokenize=False, add_generation_prompt=True)
    assert prefix + suffix == full
    assert suffix.endswith("<|im_start|>assistant\n")
    assert builder.prefix_ids("PROFILE") + builder.suffix_ids("x") == (
        tok(prefix, add_special_tokens=False)["input_ids"] + tok(builder.suffix_text("x"), add_special_tokens=False)["input_ids"])


def test_plain_prompt_without_chat_template():
    builder = PromptBuilder(tiny_tokenizer(), PromptConfig(use_chat_template=False))
    assert builder.suffix_text("Big (1988)") == "Movie: Big (1988)\nRating:"
    assert builder.prefix_text("P").endswith("P\n\n")


def test_long_term_memory_goes_before_the_movie_in_its_user_turn():
    tok = tiny_tokenizer()
    builder = PromptBuilder(tok)
    memory = "Similar movies they rated: Heat (1995): 4/5."
    suffix = builder.suffix_text("Alien (1979) [Horror]", memory)
    full = tok.apply_chat_template(
        [{"role": "system", "content": f"{PromptConfig().instruction}\n\nPROFILE"},
         {"role": "user", "content": memory + "\nMovie: Alien (1979) [Horror]"}], tokenize=False,
        add_generation_prompt=True)
    assert builder.prefix_text("PROFILE") + suffix == full
    assert builder.suffix_text("x", "") == builder.suffix_text("x")
    plain = PromptBuilder(tok, PromptConfig(use_chat_template=False))
    assert plain.suffix_text("Big (1988)", "M.") == "M.\nMovie: Big (1988)\nRating:"
