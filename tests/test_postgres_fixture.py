"""The `postgres` fixture: a throwaway PostgreSQL server that SQLAlchemy (psycopg 3) can use."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect, text


def test_postgres_url_roundtrip(postgres):
    assert postgres.url == f"postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/svdserve"
    engine = create_engine(postgres.url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE fixture_check (id serial PRIMARY KEY, name text NOT NULL)"))
            conn.execute(text("INSERT INTO fixture_check (name) VALUES (:a), (:b)"), [{"a": "x", "b": "y"}])
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, name FROM fixture_check ORDER BY id")).all()
            assert [tuple(r) for r in rows] == [(1, "x"), (2, "y")]
            assert conn.execute(text("SELECT current_setting('server_version_num')::int")).scalar() >= 150000
            assert conn.execute(text("SHOW server_encoding")).scalar() == "UTF8"
            conn.execute(text("DROP TABLE fixture_check"))
            conn.commit()
    finally:
        engine.dispose()


def test_new_database_is_empty(postgres):
    occupied = create_engine(postgres.new_database())
    with occupied.begin() as conn:
        conn.execute(text("CREATE TABLE occupied (id int)"))
    occupied.dispose()

    url = postgres.new_database()
    assert url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/t_")
    assert url != postgres.url
    named = postgres.new_database("fixture_named")
    assert named.endswith("/fixture_named")
    for u in (url, named):
        fresh = create_engine(u)
        try:
            with fresh.connect() as conn:
                assert inspect(conn).get_table_names() == []
                assert conn.execute(text("SELECT current_database()")).scalar() == u.rsplit("/", 1)[1]
        finally:
            fresh.dispose()
