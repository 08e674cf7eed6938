"""
Every class of xcauth (and every public fake) that declares one of the
contracts of L{xcauth.interfaces} has the contract's methods and attributes
with matching signatures.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyClass

import xcauth
from xcauth import interfaces


def contracts() -> list[InterfaceClass]:
    return [v for v in vars(interfaces).values()
            if isinstance(v, InterfaceClass) and v is not Interface]


def implementers() -> list[tuple[InterfaceClass, type]]:
    """
    (contract, class) for every class of every xcauth module that declares
    a contract of L{xcauth.interfaces}.
    """
    found = []
    for info in pkgutil.walk_packages(xcauth.__path__, "xcauth."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for contract in contracts():
                if contract.implementedBy(cls):
                    found.append((contract, cls))
    return found


class ContractTests(SynchronousTestCase):
    def test_everyImplementerKeepsItsContract(self) -> None:
        from tests.unit.fakes import ManualAuthenticator, TableAuthenticator
        found = implementers()
        self.assertGreaterEqual(len(found), 9)
        found += [(interfaces.IAuthenticator, ManualAuthenticator),
                  (interfaces.IAuthenticator, TableAuthenticator)]
        for contract, cls in found:
            self.assertTrue(verifyClass(contract, cls), f"{cls} {contract}")

    def test_everyContractHasAnImplementer(self) -> None:
        """
        No contract is left without a class that declares it (the walk finds
        them: a contract no class declares would be dead, or the walk blind).
        """
        declared = {contract for contract, _ in implementers()}
        self.assertEqual({c.__name__ for c in contracts()} - {c.__name__ for c in declared},
                         set())
