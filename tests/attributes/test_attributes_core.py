"""The attributes core: PII kept out, later traits win, merges keep the newer values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.attributes.core import PII_TRAITS, Attributes, clean, fold, merge


def test_pii_traits_are_kept_out_unless_listed_plain() -> None:
    traits = {
        "email": "ana@x.io",
        "Phone": "+1 555",
        "firstName": "Ana",
        "last_name": "Lee",
        "Address Line 1": "1 Main St",
        "birthday": "1990-01-01",
        "owner": "sam@corp.io",  # an email address whatever the trait is called
        "zip": "94027",
        "Product Tier": "enterprise",
    }
    kept, dropped = clean(traits)
    assert kept == {"zip": "94027", "product_tier": "enterprise"}
    assert sorted(dropped) == [
        "address_line_1",
        "birthday",
        "email",
        "first_name",
        "last_name",
        "owner",
        "phone",
    ]
    kept, _ = clean(traits, plain={"first_name"})
    assert kept["first_name"] == "Ana" and "last_name" not in kept
    assert "first_name" in PII_TRAITS


def test_an_older_event_fills_gaps_but_does_not_overwrite() -> None:
    a = fold(None, "c", {"plan": "pro"}, 2000, "identify")
    b = fold(a, "c", {"plan": "free", "zip": "1"}, 1000, "crm")
    assert b.attributes == {"plan": "pro", "zip": "1"} and b.updated_at == 2000


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["plan", "zip", "tier"]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 10),
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda t: t[2],
    )
)
def test_folding_in_any_order_ends_with_each_traits_latest_value(
    updates: list[tuple[str, str, int]],
) -> None:
    def run(order: list[tuple[str, str, int]]) -> dict[str, str]:
        cur: Attributes | None = None
        for k, v, t in order:
            cur = fold(cur, "c", {k: v}, t, "identify")
        assert cur is not None
        return dict(cur.attributes)

    latest: dict[str, tuple[int, str]] = {}
    for k, v, t in updates:
        if k not in latest or t > latest[k][0]:
            latest[k] = (t, v)
    expected = {k: v for k, (_, v) in latest.items()}
    # time order gives the latest value of every trait
    assert run(sorted(updates, key=lambda u: u[2])) == expected


def test_merge_moves_attributes_to_the_survivor_newer_values_win() -> None:
    survivor = Attributes("s", {"plan": "free"}, 1000, ("identify",))
    absorbed = Attributes("a", {"plan": "pro", "zip": "94027"}, 5000, ("crm",))
    m = merge(survivor, absorbed, "s")
    assert m.customer_id == "s"
    assert m.attributes == {"plan": "pro", "zip": "94027"}
    assert merge(None, absorbed, "s").attributes == absorbed.attributes
