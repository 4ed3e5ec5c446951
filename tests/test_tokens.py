"""The one token scrubber every message, log and link goes through."""

from merger.scrub import TOKEN_PATTERN, scrub


def test_scrub_removes_user_oauth_and_known_tokens_but_not_identifiers() -> None:
    user, oauth = "hf_" + "A1b2C3d4E5" * 3 + "xyzw", "hf_oauth_" + "Q9" * 14
    text = f"user {user}, oauth {oauth}, job secret tok-123, call hf_hub_download, short hf_abc"
    assert scrub(text, ["tok-123", None]) == "user ***, oauth ***, job secret ***, call hf_hub_download, short hf_abc"
    assert TOKEN_PATTERN.search(oauth) and not TOKEN_PATTERN.search("hf_hub_download")
