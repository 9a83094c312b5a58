from stock.engine import StockEngine


async def test_reserve_confirm_roundtrip(engine: StockEngine) -> None:
    await engine.set_stock("A", 3)
    result = await engine.reserve("o1", [{"sku": "A", "qty": 2}])
    assert result.status == "reserved"
    confirmed = await engine.confirm("o1")
    assert confirmed.status == "confirmed"
    stock = await engine.get_stock("A")
    assert (stock.available, stock.reserved, stock.sold) == (1, 0, 2)
