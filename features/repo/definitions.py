"""OSMF's Feast definitions: entities, push sources and feature views (declarations only).

This folder is what ``feast apply`` scans; code that writes and reads
features lives beside it (``features/store.py``, ``features/push.py``,
``features/read.py``). Which online and offline store hold the data is chosen
by ``feature_store.yaml``, generated from the settings (``osmf features apply``).

Every view is fed by a :class:`~feast.PushSource` (the stream worker pushes
updates) with a parquet :class:`~feast.FileSource` behind it that keeps the
history for point-in-time training joins. Batch source paths are relative to
the store's repo path, ``<data_dir>/features``.

Timestamps: ``event_timestamp`` is the event time the value describes (the
latest impression or click counted; strictly increasing per entity), and
point-in-time joins use it alone. The history also records ``created``, the
wall-clock time of the push, but it is deliberately not the sources'
``created_timestamp_column``: Feast would then hide every value pushed after a
training row's event time, which for replayed or simulated traffic (event time
long before the push) hides everything.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64, String

EVENT_TIMESTAMP = "event_timestamp"
NO_TTL = timedelta(0)  # history never expires for point-in-time joins

group = Entity(
    name="group",
    join_keys=["group_id"],
    value_type=ValueType.STRING,
    description="A user group of one product category, id 'category/g<N>' (stable across reclustering).",
)
product = Entity(name="product", join_keys=["product_id"], value_type=ValueType.STRING, description="A product.")
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="An end user.")
category = Entity(
    name="category",
    join_keys=["category"],
    value_type=ValueType.STRING,
    description="A product category; a user has one group per category.",
)


def _push_source(name: str) -> PushSource:
    return PushSource(
        name=f"{name}_push",
        batch_source=FileSource(
            name=f"{name}_history",
            path=f"offline/{name}",
            timestamp_field=EVENT_TIMESTAMP,
            description=f"Parquet history of {name} (one part file per offline flush).",
        ),
        description=f"Stream updates of {name}, pushed by the worker.",
    )


group_profile_push = _push_source("group_profile")
group_creative_preferences_push = _push_source("group_creative_preferences")
user_group_push = _push_source("user_group")
product_profile_push = _push_source("product_profile")

group_profile = FeatureView(
    name="group_profile",
    entities=[group],
    ttl=NO_TTL,
    source=group_profile_push,
    online=True,
    schema=[
        Field(name="category", dtype=String, description="Product category the group belongs to."),
        Field(name="rule", dtype=String, description="Which users belong, e.g. 'age_band in {18-24, 25-34}'."),
        Field(name="member_count", dtype=Int64, description="Users whose current group this is."),
        Field(name="weight", dtype=Float64, description="Events of its users (decayed by the grouper's halflife)."),
        Field(
            name="centroid_keys",
            dtype=Array(String),
            description="'attribute=value' name of each centroid dimension.",
        ),
        Field(
            name="centroid",
            dtype=Array(Float64),
            description="Share of the group's traffic with each attribute value: the per-attribute "
            "distributions of its members, concatenated (dimensions named by centroid_keys).",
        ),
    ],
    description="Who is in a group: size, rule and attribute distributions (centroid).",
)

group_creative_preferences = FeatureView(
    name="group_creative_preferences",
    entities=[group],
    ttl=NO_TTL,
    source=group_creative_preferences_push,
    online=True,
    schema=[
        Field(name="impressions", dtype=Int64, description="Impressions counted for the group (all products)."),
        Field(name="clicks", dtype=Int64, description="Attributed clicks counted for the group."),
        Field(name="ctr", dtype=Float64, description="clicks / impressions (0 without impressions)."),
        Field(name="attribute_keys", dtype=Array(String), description="Visual attributes seen, 'attribute=value'."),
        Field(name="attribute_impressions", dtype=Array(Int64), description="Impressions per attribute_keys entry."),
        Field(name="attribute_clicks", dtype=Array(Int64), description="Clicks per attribute_keys entry."),
        Field(name="attribute_ctr", dtype=Array(Float64), description="Observed CTR per attribute_keys entry."),
        Field(name="top_prompts", dtype=Array(String), description="Best creative prompts of the group, best first."),
        Field(name="top_prompt_impressions", dtype=Array(Int64), description="Impressions of each top prompt."),
        Field(name="top_prompt_clicks", dtype=Array(Int64), description="Clicks of each top prompt."),
        Field(
            name="top_prompt_score",
            dtype=Array(Float64),
            description="Posterior mean CTR that ranks the top prompts (Beta prior at the group's CTR).",
        ),
    ],
    description="What a group clicks on: its CTR, its CTR per visual creative attribute, its top prompts.",
)

user_group = FeatureView(
    name="user_group",
    entities=[user, category],
    ttl=NO_TTL,
    source=user_group_push,
    online=True,
    schema=[Field(name="group_id", dtype=String, description="The user's current group in the category.")],
    description="A user's current group per category, so serving resolves user -> group without the grouper.",
)

product_profile = FeatureView(
    name="product_profile",
    entities=[product],
    ttl=NO_TTL,
    source=product_profile_push,
    online=True,
    schema=[
        Field(name="category", dtype=String, description="Product category."),
        Field(name="price", dtype=Float64, description="Price as last seen in an impression."),
        Field(name="title", dtype=String, description="Product title."),
        Field(
            name="title_embedding",
            dtype=Array(Float32),
            description="all-MiniLM-L6-v2 sentence embedding of the title (384 dims, unit length).",
        ),
        Field(name="image_ref", dtype=String, description="Where the product image is, when events say so."),
    ],
    description="Product attributes and the title embedding.",
)
