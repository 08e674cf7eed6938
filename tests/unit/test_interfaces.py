"""
Every class of xcauth and of its tests (the public fakes and the tests' own)
that declares an interface, one of L{xcauth.interfaces} or one of Twisted's,
has the interface's methods and attributes with matching signatures; and
instances of the fakes and of the classes that need no I/O to be made provide
theirs (C{verifyObject}).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementedBy
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyClass, verifyObject

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


def declared(packages: tuple[str, ...] = ("xcauth", "tests.unit")) -> list[tuple[type, Any]]:
    """
    (class, interface) for every interface that a class defined in a module
    of C{packages} declares itself, Twisted's included.
    """
    import tests.unit

    found = []
    roots = {"xcauth": xcauth, "tests.unit": tests.unit}
    for package in packages:
        root = roots[package]
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module.__name__:
                    continue
                for interface in implementedBy(cls).declared:
                    found.append((cls, interface))
    return found


class DeclaredInterfaceTests(SynchronousTestCase):
    def test_everyDeclaredInterfaceKept(self) -> None:
        """
        Twisted's interfaces too: producers, half-closeable protocols,
        endpoints, HTTP body producers, the tests' own fakes.
        """
        found = declared()
        names = {i.__name__ for _, i in found}
        self.assertTrue({"IPushProducer", "IHalfCloseableProtocol", "IStreamServerEndpoint",
                         "IBodyProducer", "IWorker", "ICommandRunner"} <= names, names)
        for cls, interface in found:
            self.assertTrue(verifyClass(interface, cls), f"{cls} {interface}")

    def test_instancesProvide(self) -> None:
        """
        Made, the fakes and the I/O-free implementers provide their
        interfaces (attributes included, which only an instance has).
        """
        from tests.unit.fakes import ManualAuthenticator, TableAuthenticator
        from xcauth.core.penalty import MemoryBudget
        from xcauth.testing.workers import ManualWorker, SynchronousWorker

        made = [
            (interfaces.IWorker, SynchronousWorker()),
            (interfaces.IWorker, ManualWorker()),
            (interfaces.IAttemptBudget, MemoryBudget()),
            (interfaces.IAuthenticator, ManualAuthenticator()),
            (interfaces.IAuthenticator, TableAuthenticator({})),
        ]
        for contract, obj in made:
            self.assertTrue(verifyObject(contract, obj), f"{obj} {contract}")

    def test_missingMethodNoticed(self) -> None:
        """
        The check fails for a class that declares an interface it does not
        keep (so that the tests above can fail).
        """
        from zope.interface import implementer
        from zope.interface.exceptions import Invalid

        @implementer(interfaces.IWorker)
        class NoRun:
            pass

        with self.assertRaises(Invalid):
            verifyClass(interfaces.IWorker, NoRun)
